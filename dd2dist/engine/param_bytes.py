"""How many parameter bytes a rank holds for a module, against the full module (ZeRO-3 partitions count their
share)."""

from __future__ import annotations

import math

from torch import nn

from dd2dist.engine.base import Engine
from dd2dist.engine.zero3_calls import is_partitioned


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank holds for ``module`` at rest (ZeRO-3 partitions count their share)."""
    total = 0
    for p in module.parameters():
        if is_partitioned(p):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def full_param_bytes(module: nn.Module) -> int:
    """Bytes of the full (unpartitioned) parameters of ``module``."""
    return sum((p.ds_numel if is_partitioned(p) else p.numel()) * p.element_size() for p in module.parameters())


def param_bytes_ratio(engine: Engine) -> float:
    """This rank's share of the engine's parameter bytes (1.0 = a full replica)."""
    full = full_param_bytes(engine.module)
    return local_param_bytes(engine.module) / full if full else math.nan
