"""``DeepSpeedEngineFactory``: the ``EngineFactory`` the trainer uses when ``engine.kind=deepspeed``."""

from __future__ import annotations

import torch
from torch import nn

from dd2dist.engine.deepspeed_frozen import DeepSpeedFrozenEngine
from dd2dist.engine.deepspeed_trainable import DeepSpeedEngine
from dd2dist.engine.optim import OptimSpec
from dd2dist.engine.process_group import ensure_distributed, worker_device


class DeepSpeedEngineFactory:
    """Builds DeepSpeed engines for the trainer (the ``EngineFactory`` protocol of ``dd2dist.engine.factory``).

    Args:
        engine_cfg: the ``engine`` config section (zero stages, precision, grad_accum).
        use_gpu: ``launch.use_gpu``.
        teacher_precision: the teacher's dtype ("fp32" / "bf16"); default from ``engine_cfg.precision``.
    """

    def __init__(self, engine_cfg, *, use_gpu: bool = False, teacher_precision: str | None = None):
        ensure_distributed()
        self.cfg = engine_cfg
        self.use_gpu = use_gpu
        self.device = worker_device(use_gpu)
        self.teacher_precision = teacher_precision or engine_cfg.precision

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def teacher(self, module: nn.Module) -> DeepSpeedFrozenEngine:
        """The frozen teacher engine (ZeRO stage ``engine.zero_stage_teacher``)."""
        return DeepSpeedFrozenEngine(
            "teacher", module, zero_stage=self.cfg.zero_stage_teacher, precision=self.teacher_precision,
            use_gpu=self.use_gpu,
        )

    def trainable(self, name: str, module: nn.Module, optim: OptimSpec) -> DeepSpeedEngine:
        """A trainable engine for ``name`` ("generator" | "guidance" | "student")."""
        stage = {
            "generator": self.cfg.zero_stage_generator,
            "guidance": self.cfg.zero_stage_guidance,
        }.get(name, self.cfg.zero_stage_generator)
        return DeepSpeedEngine(
            name, module, optim, zero_stage=stage, precision=self.cfg.precision, use_gpu=self.use_gpu,
        )

    def barrier(self) -> None:
        """All ranks wait here (collective)."""
        torch.distributed.barrier()
