"""How the trainer obtains engines: the ``EngineFactory`` protocol, the optimizer spec, and the plain-torch factory.

The trainer never constructs engines itself; it asks a factory, so the same trainer runs on ``TorchEngine`` (one
process, tests) and on DeepSpeed engines inside Ray workers (``DeepSpeedEngineFactory``, implemented elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dd2dist.engine.base import Engine


@dataclass(frozen=True)
class OptimSpec:
    """AdamW + clipping + a linear LR warm-up on the engine's own step counter.

    ``lr_at(n)`` is the LR of optimizer step n (0-based): linear from ``lr_start`` to ``lr`` over ``warmup_steps``
    steps (``lr`` is reached at step warmup_steps - 1), then constant. ``grad_accum`` micro-batches are
    accumulated per step; ``Engine.backward`` divides each micro-batch loss by it.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    lr_start: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_start < 0:
            raise ValueError(f"OptimSpec: lr must be > 0 and lr_start >= 0, got lr={self.lr}, lr_start={self.lr_start}")
        if self.grad_accum < 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(
                f"OptimSpec: grad_accum >= 1, warmup_steps >= 0, grad_clip >= 0 required; got {self.grad_accum}, "
                f"{self.warmup_steps}, {self.grad_clip}"
            )

    def lr_at(self, n: int) -> float:
        if self.warmup_steps <= 0:
            return self.lr
        return self.lr_start + (self.lr - self.lr_start) * min(1.0, (n + 1) / self.warmup_steps)


@runtime_checkable
class EngineFactory(Protocol):
    """Builds the engines of a run. Every rank calls the same methods in the same order (collectives inside).

    ``device``: where modules live and where the trainer allocates its tensors.
    ``teacher(module)``: a frozen, forward-only engine (no optimizer) for the teacher.
    ``trainable(name, module, optim)``: an engine with its own optimizer for a student net
        ("student_head", "student", "generator", "guidance").
    ``barrier()``: all ranks wait (no-op in one process).
    """

    device: torch.device

    def teacher(self, module: nn.Module) -> Engine: ...

    def trainable(self, name: str, module: nn.Module, optim: OptimSpec) -> Engine: ...

    def barrier(self) -> None: ...


class TorchEngineFactory:
    """Plain-torch engines in this process (no process group)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def teacher(self, module: nn.Module) -> Engine:
        from dd2dist.engine.torch_engine import TorchEngine

        return TorchEngine("teacher", module, None, device=self.device)

    def trainable(self, name: str, module: nn.Module, optim: OptimSpec) -> Engine:
        from dd2dist.engine.torch_engine import TorchEngine

        return TorchEngine(name, module, optim, device=self.device)

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
