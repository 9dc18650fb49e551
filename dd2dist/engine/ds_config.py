"""The DeepSpeed config dicts of the trainable and the frozen engines (pure: no DeepSpeed import)."""

from __future__ import annotations

from typing import Any

import torch

from dd2dist.engine.optim import OptimSpec

PRECISIONS = ("fp32", "bf16")


def precision_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def trainable_ds_config(
    optim: OptimSpec, *, zero_stage: int, precision: str, grad_accum: int | None = None, micro_batch: int = 1
) -> dict[str, Any]:
    """The DeepSpeed config of a trainable engine with optimizer spec ``optim``.

    The AdamW itself is built by the engine (``optim.adamw_kwargs()``) and passed in, and there is no scheduler
    (the engine owns the LR), so what DeepSpeed takes from ``optim`` here is the gradient clipping and, unless
    ``grad_accum`` overrides it, the number of micro-steps per optimizer step.

    ZeRO-3 partitions every parameter (no persistent small ones, so a rank holds exactly 1/world at rest) and
    does not prefetch: the call pattern changes between phases (generate / features / velocity), so a recorded
    trace would keep being invalidated.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage_<trainable>={zero_stage}: trainable engines take ZeRO 0, 1, 2 or 3")
    if precision not in PRECISIONS:
        raise ValueError(f"engine.precision must be one of {PRECISIONS}, got {precision!r}")
    zero: dict[str, Any] = {"stage": int(zero_stage)}
    if zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=0,
            stage3_model_persistence_threshold=0,
            stage3_prefetch_bucket_size=0,
            stage3_max_reuse_distance=0,
            # DeepSpeed would otherwise replace torch.nn.functional.linear process-wide (for every module, ZeRO or
            # not) with its own autograd function: other engines' arithmetic would depend on whether a ZeRO-3
            # engine was built first. Module hooks already re-gather weights for backward.
            memory_efficient_linear=False,
        )
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum if grad_accum is not None else optim.grad_accum),
        "gradient_clipping": float(optim.grad_clip),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def frozen_ds_config(*, zero_stage: int = 3, precision: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config of the frozen teacher: ZeRO-3 partitioning only, no optimizer, no prefetching.

    Prefetching is off because the teacher's call pattern changes between phases (teacher-forced passes,
    KV-cached sampling) and a recorded trace would be invalidated anyway. Persistence is off so that every
    parameter is partitioned (small ones too): memory at rest is exactly 1/world of the teacher.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"teacher precision must be one of {PRECISIONS}, got {precision!r}")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": int(zero_stage),
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_live_parameters": 1 << 40,
            "stage3_max_reuse_distance": 0,
            # no backward through the teacher, and DeepSpeed's version would replace F.linear process-wide (the
            # students' arithmetic would depend on whether a teacher engine was built)
            "memory_efficient_linear": False,
        },
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
    }
