"""The local MLflow server: command shape, and a real server on a free port that a client logs to over HTTP."""

from __future__ import annotations

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
sys.path.insert(0, str(REPO))

from infra.mlflow.local_server import is_loopback, server_command, wait_ready  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_uses_sqlite_loopback_one_worker_no_job_runner(tmp_path: Path) -> None:
    argv, env = server_command(tmp_path / "store", port=5123)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--workers") + 1] == "1"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{(tmp_path / 'store').resolve()}/mlflow.db"
    assert argv[argv.index("--artifacts-destination") + 1] == str((tmp_path / "store" / "artifacts").resolve())
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_refuses_non_loopback_and_bad_numbers(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    with pytest.raises(ValueError, match="not a loopback"):
        server_command(tmp_path, host="0.0.0.0")
    with pytest.raises(ValueError, match="port"):
        server_command(tmp_path, port=70000)
    with pytest.raises(ValueError, match="workers"):
        server_command(tmp_path, workers=0)


def host_header_status(url: str, host: str) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow  # 10 s alone, 25 s when the 2 cores are shared (the server's cold start)
@pytest.mark.integration
def test_log_and_read_back_over_http(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "mlflow"
    log = open(tmp_path / "server.log", "w")
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, str(REPO / "infra/mlflow/local_server.py"), "--root", str(root), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_ready(url, timeout_s=90, process=server)
        print(f"local mlflow server ready in {time.monotonic() - started:.1f} s")
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("infra-test")
        run = client.create_run(experiment, run_name="tiny")
        run_id = run.info.run_id
        client.log_param(run_id, "teacher.family", "var")
        losses = {0: 1.5, 10: 0.75, 20: 0.375, 30: 0.1875}
        for step, value in losses.items():
            client.log_metric(run_id, "loss/generator", value, step=step)
        report = tmp_path / "eval.json"
        report.write_text('{"fid": 12.5}')
        client.log_artifact(run_id, str(report), artifact_path="eval")
        client.set_terminated(run_id)

        history = client.get_metric_history(run_id, "loss/generator")
        assert {m.step: m.value for m in history} == losses
        fetched = client.get_run(run_id)
        assert fetched.data.params == {"teacher.family": "var"}
        assert fetched.info.status == "FINISHED"
        downloaded = client.download_artifacts(run_id, "eval/eval.json", str(tmp_path / "dl"))
        assert Path(downloaded).read_text() == '{"fid": 12.5}'
        # Proxied artefacts: the file went through the server into its own folder, and runs live in SQLite.
        stored = list((root / "artifacts").rglob("eval.json"))
        assert len(stored) == 1 and stored[0].read_text() == '{"fid": 12.5}'
        assert (root / "mlflow.db").stat().st_size > 0
        # Host-header protection stays on: loopback names pass, other names are refused.
        assert host_header_status(url, f"127.0.0.1:{port}") == 200
        assert host_header_status(url, "attacker.example:80") in (400, 403)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
    assert server.returncode is not None
