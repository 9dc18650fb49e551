"""The engine interface the trainer and the method code talk to.

An engine owns one network and, when trainable, its optimizer, LR scheduler and step counter. Two
implementations share this interface: ``TorchEngine`` (plain torch, one process; unit tests and single-process
runs) and ``DeepSpeedEngine`` / ``DeepSpeedFrozenEngine`` (ZeRO, inside Ray Train workers). Method code
(``dd2dist/method``) receives ``engine.callable_module()`` for forwards and never imports DeepSpeed.

Rules that keep every rank in lock-step (ZeRO-3 gathers hang otherwise):
  * every rank runs the same number of forwards through each engine per iteration;
  * in each phase exactly one engine is trainable (``set_trainable(True)``), the others are frozen
    (``requires_grad=False``, eval mode) and a forward that must carry gradients *through* a frozen engine
    goes through ``engine.callable_module()`` (never the DeepSpeed engine's own ``__call__``);
  * a non-finite loss is detected collectively (``all_finite``) so that every rank skips the same step.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass
class StepStats:
    """What one optimizer step did."""

    grad_norm: float  # global grad norm before clipping (nan when unknown)
    lr: float  # the LR used for this step
    skipped: bool = False  # True when the step was skipped (non-finite gradients)


class Engine(abc.ABC):
    """A network, possibly with its optimizer. ``module`` is the plain nn.Module to call for forwards."""

    name: str  # "teacher" | "generator" | "guidance" | "student"
    module: nn.Module

    @property
    @abc.abstractmethod
    def trainable(self) -> bool:
        """Whether this engine has an optimizer and is currently set trainable."""

    @abc.abstractmethod
    def set_trainable(self, flag: bool) -> None:
        """Train mode + requires_grad on every parameter (True), or eval + frozen (False).

        Frozen engines without an optimizer (the teacher) only accept False.
        """

    def callable_module(self):
        """What method code calls for forwards (``features`` / ``velocity`` / ``generate`` ...).

        The module itself by default; a ZeRO-3 trainable engine returns a proxy with the same API whose calls run
        through the DeepSpeed root forward (so its hooks gather what the call reads). ``module`` stays the place
        for modes, parameters and weights.
        """
        return self.module

    def assert_mode(self, trainable: bool) -> None:
        """Phase-switch check: module mode and requires_grad agree with ``trainable``."""
        params = [p for p in self.module.parameters()]
        flags = {p.requires_grad for p in params}
        if self.module.training != trainable or (params and flags != {trainable}):
            raise AssertionError(
                f"{self.name}: expected trainable={trainable}, got module.training={self.module.training}, "
                f"requires_grad={sorted(flags)}"
            )

    # ---- optimisation (trainable engines only) ------------------------------------------------------
    @abc.abstractmethod
    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of ``loss`` into this engine's parameters."""

    @abc.abstractmethod
    def step(self) -> StepStats:
        """Clip, optimizer step, scheduler step, zero grads; counts only steps actually taken."""

    @abc.abstractmethod
    def skip_step(self) -> StepStats:
        """Drop the accumulated gradients without stepping (used when any rank saw a non-finite loss)."""

    @property
    @abc.abstractmethod
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (the scheduler's clock: it never ticks without its optimizer)."""

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The LR the next step will use."""

    # ---- weights and state ----------------------------------------------------------------------------
    @abc.abstractmethod
    def local_param_tensors(self) -> list[Tensor]:
        """This rank's copy of the trainable weights, in a fixed order (full tensors, or ZeRO-3 partitions).

        The EMA averages exactly these tensors, so it shards the same way as the engine.
        """

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, Tensor]:
        """Consolidated module weights on CPU (gathers ZeRO-3 partitions; collective: call on every rank)."""

    @abc.abstractmethod
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load consolidated module weights (collective under ZeRO-3)."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Save this rank's share of the engine (weights, optimizer, scheduler, counters) under ``directory``."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (same world size)."""

    def reset_optimizer(self, lr_schedule=None) -> None:  # noqa: B027 - optional hook
        """Start a fresh optimizer/scheduler (phase changes may do this); default: keep the current one."""


def all_finite(value: Tensor) -> bool:
    """True iff ``value`` is finite on every rank (a collective when torch.distributed is initialised)."""
    flag = torch.tensor([float(torch.isfinite(value.detach()).all())], dtype=torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)
