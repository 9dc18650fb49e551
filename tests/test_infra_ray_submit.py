"""`ray job submit` of the smoke_var_deepspeed recipe to a local Ray head: the way a user drives a Ray cluster.

Needs jobs/distill.py and configs/experiments/smoke_var_deepspeed.yaml; it fails (does not skip) while they are missing.
The head runs as `ray start --head --block` in its own session and is stopped by signalling that session only:
`ray stop` would also kill every other Ray on the machine (other tests', other users'). Token authentication is
turned off (RAY_AUTH_MODE=disabled) so the run does not depend on whether ~/.ray/auth_token happens to exist;
everything binds to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
CONFIG = "configs/experiments/smoke_var_deepspeed.yaml"
JOB_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(tmpdir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=tmpdir,
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    # The job's `python` is looked up on the head's PATH: make it this venv's, as with an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_head(tmpdir: str, num_cpus: int = 2) -> tuple[subprocess.Popen, str]:
    """A Ray head on loopback in its own session; returns (process, dashboard URL) once jobs can be submitted."""
    os.makedirs(tmpdir, exist_ok=True)
    gcs_port, dashboard_port = free_port(), free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", str(num_cpus), "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--disable-usage-stats",
         # the agents' default ports (52365, ...) may be held by another Ray on this machine (the test session's
         # embedded one): then the head's job agent never registers. Give every agent a port of its own.
         *[arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                            "--runtime-env-agent-port", "--ray-client-server-port")
           for arg in (flag, str(free_port()))]],
        env=ray_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline, last_error = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{head.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return head, url
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last_error = err
        time.sleep(0.5)
    stop_head(head)
    raise TimeoutError(f"the Ray dashboard / job server did not come up within 90 s (last error: {last_error})")


def session_alive(head: subprocess.Popen) -> bool:
    """Whether any process of the head's session (ray start and the Ray processes it spawned) is running."""
    listing = subprocess.run(["ps", "-o", "stat=", "-s", str(head.pid)], capture_output=True, text=True)
    return any(not stat.startswith("Z") for stat in listing.stdout.split())


def stop_head(head: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM `ray start --block` (it then stops its Ray processes); SIGKILL the session after ``grace_s``."""
    if head.poll() is None:
        head.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_alive(head):
        time.sleep(0.5)
    if session_alive(head):
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def submit(url: str, working_dir: Path, entrypoint: list[str], env_vars: dict[str, str], tmpdir: str,
           timeout_s: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`ray job submit` (blocking: exit code 0 only when the job succeeded)."""
    command = [RAY, "job", "submit", "--address", url, "--working-dir", str(working_dir),
               "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint]
    # The job server answers before the head's dashboard agent has registered (slow on a loaded machine): a
    # submission refused with "No available agent" never started, so it is safe to retry for a while.
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(command, env=ray_env(tmpdir), capture_output=True, text=True, timeout=timeout_s,
                                cwd=working_dir)
        if "No available agent" not in result.stdout + result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(3)


@pytest.mark.slow
@pytest.mark.integration
def test_ray_job_submit_smoke_var_deepspeed(tmp_path: Path) -> None:
    for needed in ("jobs/distill.py", CONFIG):
        assert (REPO / needed).is_file(), f"{needed} is missing: this test needs the distillation entry point"
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    output = tmp_path / "run"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tmpdir = f"/tmp/dd2rs{os.getpid()}"  # Ray socket paths are capped at 107 bytes: keep it short
    head, url = start_head(tmpdir)
    try:
        started = time.monotonic()
        result = submit(url, REPO, ["python", "jobs/distill.py", "--config", CONFIG, "--output", str(output)],
                        {"MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}, tmpdir)
        print(f"ray job submit: {time.monotonic() - started:.1f} s")
        assert result.returncode == 0, f"job failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
        assert "succeeded" in result.stdout.lower()
    finally:
        stop_head(head)
    # what the user reads: a line per phase from rank 0, not Ray Train's reports or DeepSpeed's FutureWarnings;
    # those are in each rank's full log
    printed = result.stdout + result.stderr
    for phase in ("stage1 head  step 2/2", "stage2 generator  step 6/6", "alignment generator  step 2/2"):
        assert phase in printed, printed[-6000:]
    assert "TrainingReport(" not in printed and "FutureWarning" not in printed, printed[-6000:]
    assert "TrainingReport(" in (output / "logs" / "rank0.log").read_text()
    assert (output / "logs" / "rank1.log").is_file()

    generator = output / "export" / "generator.safetensors"
    assert generator.is_file(), f"no exported generator under {output}: {sorted(p.name for p in output.iterdir())}"
    with safe_open(str(generator), framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(f.get_tensor(k).numel() > 0 for k in keys[:5])
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, f"the job logged no MLflow run to {tracking_uri}"
    assert any(run.data.metrics for run in runs), "the MLflow run has no metrics"
