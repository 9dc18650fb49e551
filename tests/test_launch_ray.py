"""Reliability of the Ray Train launch on CPU with 2 workers (smoke_var_deepspeed recipe, one Ray for the session):

* exact resume: stop at N, rerun with the same name to 2N == an uninterrupted 2N-step run (rel 1e-5);
* a worker SIGKILLed mid-run: the worker group restarts from the last checkpoint by itself, finishes with the
  same weights, and the MLflow history has every logged step exactly once (plus the export and sample grids).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd2dist.launch.ray_train import WORKERS_DIR, checkpoint_root, launch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 32  # iterations of the smoke_var_deepspeed schedule
HALF = 16


def _generator_weights(cfg, step: int) -> dict[str, torch.Tensor]:
    path = checkpoint_root(cfg) / f"step_{step:08d}" / "engines" / "generator" / "engine"
    return torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _assert_close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tiny_uninterrupted):
    return tiny_uninterrupted  # shared with tests/test_run_safety_ray.py: one reference run per session


def test_exact_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, tiny_cfg):
    cfg = tiny_cfg(tmp_path, "resumed")
    first = launch(cfg, max_iterations=HALF)
    assert first["iteration"] == HALF and first["export"] is None
    second = launch(cfg)  # same name and storage: continues from step HALF
    assert second["iteration"] == TOTAL and second["run_id"] == first["run_id"]
    _assert_close(_generator_weights(cfg, TOTAL), _generator_weights(uninterrupted, TOTAL))
    _assert_close(load_file(second["export"]), load_file(str(Path(uninterrupted.output_dir) / "export" /
                                                             "generator.safetensors")))
    starts = (Path(cfg.output_dir) / WORKERS_DIR / "starts.log").read_text().splitlines()
    assert len(starts) == 4  # two launches x two ranks


def _kill_rank1_after_first_checkpoint(cfg, killed: dict) -> None:
    first = checkpoint_root(cfg) / f"step_{cfg.launch.checkpoint_every:08d}"
    pid_file = Path(cfg.output_dir) / WORKERS_DIR / "rank1.pid"
    deadline = time.time() + 240
    while time.time() < deadline and not (first / "state.json").is_file():
        time.sleep(0.05)
    if pid_file.is_file():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
        except ProcessLookupError:
            pass


def test_sigkilled_worker_restarts_from_checkpoint(tmp_path, uninterrupted, tiny_cfg):
    cfg = tiny_cfg(tmp_path, "killed", "launch.max_failures=1", "tracking.sample_grid_every=8")
    killed: dict = {}
    killer = threading.Thread(target=_kill_rank1_after_first_checkpoint, args=(cfg, killed), daemon=True)
    killer.start()
    summary = launch(cfg)
    killer.join(timeout=5)
    assert killed, "rank 1 was not killed (it finished before the first checkpoint?)"
    assert summary["iteration"] == TOTAL and summary["export"]

    starts = [json.loads(line) for line in
              (Path(cfg.output_dir) / WORKERS_DIR / "starts.log").read_text().splitlines()]
    assert sorted(s["rank"] for s in starts) == [0, 0, 1, 1]  # the group was restarted once
    assert killed["pid"] in {s["pid"] for s in starts if s["rank"] == 1}

    # the restarted run ends exactly where the uninterrupted one does
    _assert_close(_generator_weights(cfg, TOTAL), _generator_weights(uninterrupted, TOTAL))

    from mlflow.tracking import MlflowClient

    from dd2dist.tracking import resolve_store

    client = MlflowClient(resolve_store(cfg.tracking, cfg.output_dir)[0])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed_from_iteration")
    steps = sorted(m.step for m in client.get_metric_history(summary["run_id"], "step_time_s"))
    assert steps == list(range(2, TOTAL + 1, 2))  # no gap, no duplicate
    artifacts = [f.path for f in client.list_artifacts(summary["run_id"], "export")]
    assert "export/generator.safetensors" in artifacts
    grids = {f.path for f in client.list_artifacts(summary["run_id"], "samples")}
    assert {"samples/final_ema.png", "samples/grid_00000032.png"} <= grids
