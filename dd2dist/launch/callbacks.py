"""The Ray run's trainer callbacks: hand-over exports to ``<output>/export`` and checkpoints reported to Ray Train."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dd2dist.train.callbacks import TrainerCallback


def _numeric(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        out[key] = value if math.isfinite(value) else float("nan")
    return out


class PhaseExport(TrainerCallback):
    """Rank 0 writes the consolidated weights of a hand-over to ``<folder>/<name>.safetensors`` (the stage-1
    student is what ``dd2dist.eval.run_eval`` evaluates; the regression's generator is
    ``dd2dist.eval.fidelity.REGRESSION_EXPORT``), atomically: a crash leaves the old file or none, never half."""

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = Path(folder), rank

    def on_export(self, trainer, name: str, state) -> None:
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        path = self.folder / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)


class RayReport(TrainerCallback):
    """Reports every checkpoint to Ray Train: rank 0 passes the directory (with the MLflow run id beside it, so a
    resumed run continues the same MLflow run), the others ``None``; every rank calls ``report``, so it is also a
    barrier. Ray keeps its own copies; the checkpoint folder itself is pruned by the trainer."""

    def __init__(self, rank: int, tracker=None):
        self.rank, self.tracker = rank, tracker

    def on_checkpoint(self, trainer, path: Path, metrics: dict) -> None:
        import ray.train

        values = {**_numeric(metrics), "iteration": float(trainer.state.iteration)}
        if self.rank == 0:
            if self.tracker is not None:
                (path / "tracking.json").write_text(json.dumps({"run_id": self.tracker.run_id}))
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                             checkpoint_dir_name=path.name)
        else:
            ray.train.report(values, checkpoint=None)
