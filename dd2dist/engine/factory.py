"""How the trainer obtains engines: the ``EngineFactory`` protocol and the plain-torch factory.

The trainer never constructs engines itself; it asks a factory, so the same trainer runs on ``TorchEngine`` (one
process, tests) and on DeepSpeed engines inside Ray workers (:mod:`dd2dist.engine.deepspeed_factory`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dd2dist.engine.base import Engine
from dd2dist.engine.optim import OptimSpec
from dd2dist.engine.torch_engine import TorchEngine

# OptimSpec is part of what a factory takes (``trainable``), so callers may import it from here too.
__all__ = ["EngineFactory", "OptimSpec", "TorchEngineFactory"]


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
        return TorchEngine("teacher", module, None, device=self.device)

    def trainable(self, name: str, module: nn.Module, optim: OptimSpec) -> Engine:
        return TorchEngine(name, module, optim, device=self.device)

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
