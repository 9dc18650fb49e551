"""The one way the trainer tells the rest of a run what happened: a list of :class:`TrainerCallback` objects.

Within an iteration the events come in this order: ``on_log`` (at the logging cadence), then, when a checkpoint is
written, ``on_log`` with its timings and ``on_checkpoint``, then ``on_step``. ``on_phase`` and ``on_export`` come
before the first step of the phase they belong to, so a checkpoint after them implies they ran. Every event reaches
every rank, in the order the callbacks were given; a callback that writes files or talks to a tracker decides for
itself which rank acts. Callbacks must not draw from the global RNG or touch the engines' weights if exact resume
matters; one may set ``trainer.stop = True`` to make ``fit`` return after the current iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from dd2dist.train.metrics import MetricsLogger

if TYPE_CHECKING:
    from dd2dist.method.schedule import Phase
    from dd2dist.train.trainer import Trainer


EVENTS = ("on_phase", "on_log", "on_step", "on_checkpoint", "on_export")


class TrainerCallback:
    """Subclass and override the events you need; every method is a no-op here."""

    def on_phase(self, trainer: Trainer, phase: Phase) -> None:
        """``phase`` was entered and its entry actions ran (once per phase, not again on a resume inside it)."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """Metrics to record at ``step``: every ``tracking.log_every`` iterations, the last iteration when ``fit``
        returns (each iteration once), and each checkpoint's ``checkpoint/*`` timings."""

    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After every iteration (and its checkpoint, if one was written); ``metrics`` are that iteration's."""

    def on_checkpoint(self, trainer: Trainer, path: Path, metrics: dict[str, float]) -> None:
        """A complete checkpoint of ``trainer.state.iteration`` is at ``path``; ``metrics``: the last iteration's,
        the write timings and ``preempted`` when a stop request caused it. Pruning waits until every callback
        returned, so a callback may still copy the directory."""

    def on_export(self, trainer: Trainer, name: str, state: dict[str, Tensor]) -> None:
        """Consolidated weights of a hand-over the method names (e.g. ``stage1_student``), on every rank."""


class OnStep(TrainerCallback):
    """A plain function ``fn(trainer, metrics)`` run after every iteration."""

    def __init__(self, fn: Callable[[Trainer, dict[str, float]], None]):
        self.fn = fn

    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.fn(trainer, metrics)


class LogMetrics(TrainerCallback):
    """Sends the trainer's metrics to a :class:`~dd2dist.train.metrics.MetricsLogger`, and the current phase and
    stage as tags (give it on rank 0 only)."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_phase(self, trainer: Trainer, phase: Phase) -> None:
        self.logger.set_tags({"phase": phase.name, "stage": phase.stage})

    def on_log(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step)


def check_callbacks(callbacks) -> list[TrainerCallback]:
    """The callbacks as a list; a plain function (a step callback of old) or an object missing an event is refused
    here rather than at the first event that reaches it, possibly hours into a run."""
    out = list(callbacks)
    for cb in out:
        missing = [e for e in EVENTS if not callable(getattr(cb, e, None))]
        if missing:
            raise TypeError(f"{cb!r} is not a TrainerCallback (no {', '.join(missing)}): subclass "
                            "dd2dist.train.callbacks.TrainerCallback, or wrap a step function in OnStep")
    return out
