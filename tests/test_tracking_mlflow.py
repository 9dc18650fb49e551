"""MLflow tracking: local shared store, params, metrics without duplicates on resume, artefacts, run reuse."""

from __future__ import annotations

import json
import math

import pytest

from dd2dist.config import load_config
from dd2dist.tracking import RUN_FILE, MLflowLogger, flatten_config, local_store, open_run, resolve_store


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(None, [f"output_dir={tmp_path / 'runs' / 'trk'}", "name=trk"])


def test_store_resolution(tmp_path, monkeypatch, cfg):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_store(cfg.tracking, cfg.output_dir)
    runs = (tmp_path / "runs").resolve()
    assert (uri, artifacts) == (f"sqlite:///{runs / 'mlflow.db'}", str(runs / "mlartifacts"))
    assert local_store(runs) == (uri, artifacts)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_store(cfg.tracking, cfg.output_dir) == ("http://127.0.0.1:5999", None)
    explicit = load_config(None, ["tracking.tracking_uri=sqlite:////tmp/x.db"]).tracking
    assert resolve_store(explicit, cfg.output_dir) == ("sqlite:////tmp/x.db", None)


def test_flatten_config_covers_every_leaf(cfg):
    flat = flatten_config(cfg)
    assert flat["stage2.guidance_per_generator"] == str(cfg.stage2.guidance_per_generator)
    assert flat["teacher.var.patch_nums"] == json.dumps(list(cfg.teacher.var.patch_nums))
    assert flat["output_dir"] == cfg.output_dir
    assert not any(isinstance(v, dict) for v in flat.values())


def test_run_params_metrics_artifacts_and_resume_without_duplicates(cfg, tmp_path):
    logger = open_run(cfg)
    run_id = logger.run_id
    stored = json.loads((tmp_path / "runs" / "trk" / RUN_FILE).read_text())
    assert stored["run_id"] == run_id
    run = logger.client.get_run(run_id)
    assert run.data.params["stage1.lr"] == str(cfg.stage1.lr)
    assert run.data.tags["teacher"] == "var(own)" and run.info.run_name == "trk"

    for step in (10, 20, 30):
        logger.log_metrics({"generator/loss": step / 10, "step_time_s": 0.1, "bad": float("nan")}, step)
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG fake")
    logger.log_artifact(png, "samples")
    logger.set_tags({"stage": "stage2"})
    assert logger.metric_history("memory/peak_rss_mb")  # peak memory is added to every call
    assert math.isnan(logger.metric_history("bad")[0][1])
    artifacts = [f.path for f in logger.client.list_artifacts(run_id, "samples")]
    assert artifacts == ["samples/grid.png"]
    # the crash: the job dies after step 30; the last checkpoint was at step 20

    resumed = open_run(cfg)  # picks the run id up from <output>/mlflow_run.json
    assert resumed.run_id == run_id and resumed.resumed
    for step in (30, 40):  # step 30 is recomputed after the resume (same values): not logged twice
        resumed.log_metrics({"generator/loss": step / 10}, step)
    resumed.log_metrics({"generator/loss": 99.0}, 40)  # a second call at the same step is dropped too
    assert resumed.metric_history("generator/loss") == [(10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)]
    resumed.close()
    assert resumed.client.get_run(run_id).info.status == "FINISHED"
    assert resumed.client.get_run(run_id).data.tags["stage"] == "stage2"


def test_a_missing_stored_run_starts_a_new_one(cfg, tmp_path):
    uri, artifacts = resolve_store(cfg.tracking, cfg.output_dir)
    path = tmp_path / "runs" / "trk" / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": uri}))
    logger = open_run(cfg)
    assert logger.run_id != "0" * 32 and not logger.resumed
    assert isinstance(logger, MLflowLogger)


def test_disabled_tracking_gives_no_logger(tmp_path):
    assert open_run(load_config(None, ["tracking.enabled=false", f"output_dir={tmp_path}"])) is None
