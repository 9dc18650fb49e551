"""Run safety of the Ray Train launch, smoke_var_deepspeed recipe, 2 DeepSpeed workers, run as a user runs it
(jobs/distill.py):

* two runs on one output directory: the second refuses at once naming the first (exit 3, Ray never started);
  SIGTERM on the first run's driver, a real ``python jobs/distill.py`` process, stops it with a checkpoint
  and exit status 75;
* SIGTERM on a worker mid-stage-2: every rank stops after the same step with a checkpoint (exit 75); rerunning
  resumes from it; a damaged newest checkpoint (both Ray's copy and the output's) is skipped, named, and the run
  falls back to the previous one; the generator at the end equals an uninterrupted run's, and MLflow holds every
  logged step once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd2dist.launch.preemption import PREEMPTED_EXIT
from dd2dist.launch.ray_train import WORKERS_DIR, checkpoint_root
from dd2dist.train import manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml")
TOTAL = 32


def _distill():
    spec = importlib.util.spec_from_file_location("distill_job", ROOT / "jobs" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the first run exited ({proc.returncode}) before {path} appeared: "
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _generator(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = output_dir / "checkpoints" / f"step_{step:08d}" / "engines" / "generator" / "engine"
    return torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_two_runs_on_one_directory_then_sigterm_on_the_driver(tmp_path, capsys, monkeypatch):
    out = tmp_path / "shared"
    ray_tmp = tempfile.mkdtemp(prefix="dd2r", dir="/tmp")  # its own short Ray folder (sockets: 107-byte paths)
    # a longer stage 2 than the recipe's, so that the first run is still training when it gets the signal
    longer = ["--set", "stage2.generator_steps=40", "--set", "alignment.after_generator_steps=40"]
    argv = ["--config", TINY, "--output", str(out), *longer]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "jobs/distill.py", *argv], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "run.lock", 180, first)
        import ray

        import dd2dist.launch.ray_train as ray_train

        def refuse(*args, **kwargs):
            raise AssertionError("a refused run must not start Ray")

        # a Ray started by an earlier test may be up: refusing both proves that nothing past the lock ran
        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.setattr(ray_train, "_launch", refuse)
        started = time.time()
        code = _distill().main(argv)
        err = capsys.readouterr().err
        assert code == 3, err
        assert time.time() - started < 30  # at once: validation and the lock, nothing else
        assert f"{out} is in use by another run (host {socket.gethostname()}, pid {first.pid}" in err
        assert "must not start Ray" not in err

        _wait_for(out / "checkpoints" / "step_00000008" / "state.json", 300, first)  # training, in stage 2
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first.returncode == PREEMPTED_EXIT, first_err[-3000:]
    record = json.loads((out / WORKERS_DIR / "stop.json").read_text())
    assert record["reason"].startswith(f"SIGTERM on the driver (pid {first.pid}")
    assert 8 <= record["iteration"] < 6 + 40 * 3  # stopped early, in stage 2
    assert f"stopped at iteration {record['iteration']}" in first_err
    assert Path(record["checkpoint"]).name == f"step_{record['iteration']:08d}"
    assert manifest.verify(record["checkpoint"]) == []
    assert not (out / "run.lock").exists()  # released on the way out


def _sigterm_rank1_after(first_checkpoint: Path, pid_file: Path, sent: dict) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not (first_checkpoint / "state.json").is_file():
        time.sleep(0.05)
    if pid_file.is_file():
        sent["pid"] = int(pid_file.read_text())
        os.kill(sent["pid"], signal.SIGTERM)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_sigterm_on_a_worker_then_resume_and_fall_back_from_a_damaged_checkpoint(tmp_path, capsys,
                                                                                  tiny_uninterrupted, tiny_cfg):
    cfg = tiny_cfg(tmp_path, "preempted")
    out = Path(cfg.output_dir)
    argv = ["--config", TINY, "--output", str(out), "--set", "name=preempted", "--set", "tracking.log_every=2"]
    distill = _distill()

    # 1. SIGTERM on rank 1 once the first checkpoint (iteration 8, stage 2) is written
    sent: dict = {}
    killer = threading.Thread(target=_sigterm_rank1_after, daemon=True,
                              args=(checkpoint_root(cfg) / "step_00000008", out / WORKERS_DIR / "rank1.pid", sent))
    killer.start()
    assert distill.main(argv) == PREEMPTED_EXIT
    killer.join(timeout=5)
    record = json.loads((out / WORKERS_DIR / "stop.json").read_text())
    stopped = record["iteration"]
    assert record["reason"].startswith(f"SIGTERM on worker pid {sent['pid']}")
    assert 8 < stopped <= 24, record  # after the signal, still in stage 2 (iterations 7-24)
    assert manifest.verify(record["checkpoint"]) == []

    # 2. rerun: resumes from that checkpoint, stops at a newer one (periodic checkpoint on the way)
    periodic = (stopped // 8 + 1) * 8
    assert distill.main([*argv, "--max-iterations", str(periodic + 3)]) == 0
    resumes = [json.loads(line) for line in (out / WORKERS_DIR / "resume.log").read_text().splitlines()]
    assert Path(resumes[-1]["loaded"]).name == f"step_{stopped:08d}" and resumes[-1]["skipped"] == []

    # 3. the newest checkpoint damaged in both copies (the output's and Ray's): skipped, named, fallback
    newest = f"step_{periodic + 3:08d}"
    for copy in (out / "checkpoints" / newest, out / "ray" / "preempted" / newest):
        _flip(copy / "ema" / "rank0.pt")
    capsys.readouterr()
    assert distill.main(argv) == 0
    printed = capsys.readouterr().out  # the workers' log lines (Ray forwards them) and the summary last
    summary, _ = json.JSONDecoder().raw_decode(printed[printed.rindex('{\n "name"'):])
    assert summary["iteration"] == TOTAL and summary["preempted"] is None and summary["export"]
    last = json.loads((out / WORKERS_DIR / "resume.log").read_text().splitlines()[-1])
    assert Path(last["loaded"]).name == f"step_{periodic:08d}"
    assert sorted(s["checkpoint"] for s in last["skipped"]) == sorted(
        str(p) for p in (out / "checkpoints" / newest, out / "ray" / "preempted" / newest))
    assert {p for s in last["skipped"] for p in s["problems"]} == {
        "ema/rank0.pt: sha256 differs from the manifest (changed after the checkpoint was written)"}

    # the twice-interrupted run ends exactly where the uninterrupted one does
    reference = Path(tiny_uninterrupted.output_dir)
    want, got = _generator(reference, TOTAL), _generator(out, TOTAL)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    export, ref_export = load_file(summary["export"]), load_file(str(reference / "export" / "generator.safetensors"))
    assert all(torch.equal(export[k], ref_export[k]) for k in ref_export)

    from mlflow.tracking import MlflowClient

    from dd2dist.tracking import resolve_store

    client = MlflowClient(resolve_store(cfg.tracking, cfg.output_dir)[0])
    run = client.get_run(summary["run_id"])
    assert run.data.tags["stopped_at_iteration"] == str(stopped)
    assert run.data.tags["resume_skipped"].startswith(newest)
    steps = sorted(m.step for m in client.get_metric_history(summary["run_id"], "step_time_s"))
    # every log_every step once across three launches, plus the two early stops' last steps; no duplicate
    assert steps == sorted(set(range(2, TOTAL + 1, 2)) | {stopped, periodic + 3})
