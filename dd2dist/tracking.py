"""MLflow tracking, from rank 0 only: the trainer's ``MetricsLogger`` backed by one MLflow run.

Where runs go:
  * ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) names a server or store: used as is;
  * otherwise ONE local store shared by every local run, so a single ``mlflow ui`` shows them all:
    ``sqlite:///<abs>/runs/mlflow.db`` with artefacts under ``runs/mlartifacts`` (``runs/`` = the parent of
    the run's output directory). View it with::

        mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db --default-artifact-root $PWD/runs/mlartifacts

What a run holds: the resolved config as flattened params, tags (teacher, stage, phase, run name), per-step
metrics (losses, grad norms, K, LRs, samples/s, step time, peak memory), sample-grid PNGs and the exported
generator as artefacts.

Resume: the run id is kept in ``<output>/mlflow_run.json`` and in every checkpoint (``tracking.json``); a resumed
job re-opens the same run. Steps between the checkpoint and the crash were already logged, and exact resume
recomputes them identically, so the logger skips every (key, step) at or below the last step MLflow already
holds for that key: the history has neither gaps nor duplicates.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_FILE = "mlflow_run.json"


def local_store(runs_root: str | os.PathLike) -> tuple[str, str]:
    """(tracking URI, artefact root) of the shared local store under ``runs_root``."""
    root = Path(runs_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts")


def resolve_store(tracking_cfg, output_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(tracking URI, artefact root or None): config, then ``MLFLOW_TRACKING_URI``, then the local store."""
    uri = tracking_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return local_store(Path(output_dir).resolve().parent)


def flatten_config(cfg: Any) -> dict[str, str]:
    """The resolved config as ``{"a.b.c": "value"}`` strings (MLflow params)."""
    from dd2dist.config import to_dict

    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

    walk("", to_dict(cfg))
    return out


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when a GPU is in use), in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"memory/peak_rss_mb": rss_kb / 1024.0}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:  # torch is always there in practice; the logger itself does not need it
        pass
    return out


class MLflowLogger:
    """A ``MetricsLogger`` writing to one MLflow run (create it on rank 0 only).

    Args:
        tracking_uri / artifact_root: the store (see :func:`resolve_store`).
        experiment: MLflow experiment name (created when missing).
        run_name: the run's display name (the config's ``name``).
        run_id: an existing run to continue (resume); None creates a new run.
        params: flattened config to record (only when the run is new).
        tags: initial tags.
        add_memory: add peak-memory metrics to every ``log_metrics`` call.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        *,
        artifact_root: str | None = None,
        run_id: str | None = None,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        add_memory: bool = True,
    ):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if artifact_root is not None:
                location = Path(artifact_root, experiment).resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.resumed = run_id is not None
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id
            if params:
                self._log_params(params)
        else:
            self.run_id = self.client.get_run(run_id).info.run_id  # raises when the run does not exist
            self.client.update_run(self.run_id, status="RUNNING")
            if tags:
                self.set_tags(tags)
        self._last_step: dict[str, int] = {}
        self.add_memory = add_memory

    # ---- MetricsLogger ------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; a key is skipped at steps MLflow already holds for it (resume)."""
        from mlflow.entities import Metric

        step = int(step)
        values = dict(metrics)
        if self.add_memory:
            values.update(peak_memory_mb())
        now = int(time.time() * 1000)
        batch = []
        for key, value in values.items():
            key = _metric_key(key)
            if step <= self._last_logged(key):
                continue
            value = float(value)
            batch.append(Metric(key=key, value=value if math.isfinite(value) else float("nan"), timestamp=now,
                                step=step))
            self._last_step[key] = step
        for start in range(0, len(batch), 900):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start:start + 900], synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (sample grid PNG, exported generator, report) to the run."""
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    # ---- extras -----------------------------------------------------------------------------------------
    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of one metric, in step order (tests, reports)."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, _metric_key(key)))

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED / FAILED / KILLED)."""
        self.client.set_terminated(self.run_id, status=status)

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 90):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 90], synchronous=True)

    def _last_logged(self, key: str) -> int:
        if key not in self._last_step:
            self._last_step[key] = -1
            if self.resumed:
                history = self.client.get_metric_history(self.run_id, key)
                if history:
                    self._last_step[key] = max(m.step for m in history)
        return self._last_step[key]


def _metric_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; anything else becomes '_'.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def open_run(cfg, *, run_id: str | None = None):
    """The rank-0 logger of a run described by ``cfg`` (ExperimentConfig), or None when tracking is off.

    ``run_id`` continues that run; otherwise the id stored in ``<output>/mlflow_run.json`` is continued when it
    exists in the store, else a new run is created (params = the flattened resolved config; tags = teacher, name)
    and its id written there.
    """
    if not cfg.tracking.enabled:
        return None
    uri, artifact_root = resolve_store(cfg.tracking, cfg.output_dir)
    run_file = Path(cfg.output_dir) / RUN_FILE
    if run_id is None and run_file.is_file():
        stored = json.loads(run_file.read_text())
        if stored.get("tracking_uri") == uri:
            run_id = stored.get("run_id")
    teacher = cfg.teacher.official or f"{cfg.teacher.family}(own)"
    tags = {"teacher": teacher, "run_name": cfg.name, "stages": ",".join(cfg.stages)}
    logger = None
    if run_id is not None:
        try:
            logger = MLflowLogger(uri, cfg.tracking.experiment, cfg.name, artifact_root=artifact_root, run_id=run_id,
                                  tags=tags)
        except Exception as err:  # the stored run was deleted or belongs to another store: start a new one
            if "RESOURCE_DOES_NOT_EXIST" not in str(err) and "not found" not in str(err).lower():
                raise
    if logger is None:
        logger = MLflowLogger(uri, cfg.tracking.experiment, cfg.name, artifact_root=artifact_root,
                              params=flatten_config(cfg), tags=tags)
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": logger.run_id, "tracking_uri": uri}))
    return logger
