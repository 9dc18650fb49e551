"""How the demo evaluates a trained family: the fidelity benchmark (:mod:`dd2dist.eval.fidelity`) over every sampler
of the run, each set scored against an independent teacher draw (the primary figures) and against the held-out
digits (the secondary column), plus the real-data floor, logged to the family's MLflow run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from dd2dist.eval.fidelity import FidelityOptions, fidelity_benchmark

NEEDED = ("teacher", "marginals", "stage1", "one_step")  # a demo report without these is a failed run
MLFLOW_METRICS = ("fid_to_teacher", "dependence_captured", "dependence_captured_pair_tv", "pair_tv",
                  "token_marginal_tv", "nll_gap", "precision", "recall", "fid_heldout", "isc_mean",
                  "class_consistency")


def train_vs_heldout_floor(num: int) -> dict:
    """FID of real training digits vs the held-out ones (at most ``num`` of them): the best a sampler can reach
    on the held-out column."""
    from dd2dist.data.digits import digits_split
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.features import digits_feature_space
    from dd2dist.eval.metrics import compute_metrics

    _, info, clf_path = cached_classifier()
    train = digits_split("train").uint8()[:num]
    floor = compute_metrics(train, digits_split("heldout").uint8(), digits_feature_space(clf_path),
                            sampling={"source": f"first {train.shape[0]} train digits"})
    return {"fid": floor["fid"], "classifier_heldout_accuracy": info["heldout_accuracy"], "classifier": clf_path}


def evaluate_family(cfg, run_dir: Path, log: Callable[[str], None] = print) -> dict:
    """The fidelity report of the run in ``run_dir`` (``eval.num_samples`` per set, ``eval.refine_steps``), with
    sample grids and ``report.json`` under ``<run>/eval`` and the real-data floor under ``floor``."""
    out = Path(run_dir) / "eval"
    opts = FidelityOptions(num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size,
                           refine_steps=tuple(cfg.eval.refine_steps), grid_dir=str(out))
    report = fidelity_benchmark(run_dir, opts, log=log)
    missing = [m for m in NEEDED if m not in report["samplers"]]
    if missing:
        raise RuntimeError(f"evaluation of {run_dir} has no {missing} result (missing weights?)")
    report["floor"] = train_vs_heldout_floor(cfg.eval.num_samples)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    report["report_path"] = str(out / "report.json")
    return report


def log_evaluation(cfg, report: dict, step: int) -> str | None:
    """Every figure as ``eval/<sampler>/<metric>`` at ``step``, the report and the grids as artefacts, in the run's
    MLflow run; returns its id (None when tracking is off)."""
    from dd2dist.tracking import open_run

    tracker = open_run(cfg)
    if tracker is None:
        return None
    try:
        metrics = {f"eval/{name}/{key}": float(res[key]) for name, res in report["samplers"].items()
                   for key in MLFLOW_METRICS
                   if isinstance(res.get(key), (int, float)) and math.isfinite(res[key])}
        tracker.log_metrics(metrics, step=step)
        tracker.log_artifact(report["report_path"], "eval")
        for res in report["samplers"].values():
            if res.get("grid"):
                tracker.log_artifact(res["grid"], "eval")
    finally:
        tracker.close()
    return tracker.run_id
