"""Sample-grid PNGs of the one-step generator, logged as MLflow artefacts during and after a run.

Decoding goes through the teacher's tokenizer, which is ZeRO-3-partitioned in a DeepSpeed run: every rank must
make the same calls (:func:`generator_grid` is collective); rank 0 writes the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dd2dist.conditions import Cond, class_major_labels
from dd2dist.train.callbacks import TrainerCallback
from dd2dist.train.condition_source import CaptionDraws

GRID_SEED = 1234  # the same noise for every grid of a run, so grids are comparable over time
GRID_ROWS = 8  # classes, or captions, shown


def grid_captions(trainer) -> Cond | None:
    """The captions of a text-conditional run's grids: the first of this rank's caption bank (None for labels)."""
    conditions = trainer.batches.conditions
    return conditions.first(GRID_ROWS) if isinstance(conditions, CaptionDraws) else None


def to_uint8_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> one (rows*H, nrow*W, 3) uint8 image, row-major, black padding."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    rows = -(-b // nrow)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.zeros(3, rows * h, nrow * w, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def generator_grid(generator_net, teacher, num_classes: int, classes: int = 8, per_class: int = 4,
                   captions: Cond | None = None) -> np.ndarray:
    """One-step samples of ``classes`` classes (rows) x ``per_class`` draws, decoded by ``teacher`` (collective).

    A text-conditional run passes ``captions``: one row per caption (at most ``classes`` of them)."""
    from dd2dist.eval.sampling import one_step

    device = next(generator_net.parameters()).device
    if captions is not None:
        shown = min(classes, captions.batch_size)
        cond = captions.select(slice(0, shown)).to(device).repeat(per_class)
    else:
        cond = Cond(labels=class_major_labels(min(classes, num_classes), per_class, device))
    noise = torch.Generator(device=device).manual_seed(GRID_SEED)
    _, ids = one_step(generator_net, cond, noise)
    images = teacher.decode(ids)
    return to_uint8_grid(images, nrow=per_class)


class SampleGrid(TrainerCallback):
    """Every ``every`` iterations, a grid of the current (non-EMA) generator (collective; rank 0 writes it and
    hands it to ``logger``, when there is one)."""

    def __init__(self, every: int, folder: Path, logger, rank: int):
        self.every, self.folder, self.logger, self.rank = every, Path(folder), logger, rank

    def on_step(self, trainer, metrics: dict) -> None:
        step = trainer.state.iteration
        generator = trainer.engines.get("generator")
        if self.every <= 0 or step % self.every or generator is None:
            return
        grid = generator_grid(generator.callable_module(), trainer.teacher_engine.module, trainer.num_classes,
                              GRID_ROWS, captions=grid_captions(trainer))
        if self.rank == 0:
            path = save_png(grid, self.folder / f"grid_{step:08d}.png")
            if self.logger is not None:
                self.logger.log_artifact(path, "samples")
