"""Exponential moving average of the generator with SiD/DD2's progressive decay (docs/method.md §10.4).

The EMA averages ``engine.local_param_tensors()``: full tensors for a plain-torch engine, this rank's partitions
under ZeRO-3, so it shards exactly like the engine and each rank saves its own share.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import Tensor


def ema_decay(updates: int, ema_max: float, warmup: Literal["progressive", "none"] = "progressive",
              rampup: float = 10.0) -> float:
    """Decay used for the EMA update number ``updates`` (0-based).

    ``progressive``: min(ema_max, (n + 1) / (n + rampup)) — with the paper's rampup = 10, 0.1 at the first update,
    reaching 0.9999 after ~90k (docs/method.md §10.4). Its averaging horizon is about
    (n + rampup) / (rampup - 1) updates: a smaller ``rampup`` averages over a larger fraction of the run (2: about
    the last half), which suits short runs. ``none``: ema_max from the start.
    """
    if rampup <= 1.0:
        raise ValueError(f"stage2.ema_rampup must be > 1, got {rampup}")
    if warmup == "progressive":
        return min(ema_max, (updates + 1) / (updates + rampup))
    if warmup == "none":
        return ema_max
    raise ValueError(f"stage2.ema_warmup must be 'progressive' or 'none', got {warmup!r}")


class EMA:
    """EMA copies of a fixed, ordered list of tensors; ``updates`` counts the updates applied."""

    def __init__(self, tensors: list[Tensor], ema_max: float, warmup: Literal["progressive", "none"] = "progressive",
                 rampup: float = 10.0):
        if not 0.0 <= ema_max <= 1.0:
            raise ValueError(f"stage2.ema_max must be in [0, 1], got {ema_max}")
        ema_decay(0, ema_max, warmup, rampup)  # validates ``warmup`` and ``rampup``
        self.ema_max, self.warmup, self.rampup = float(ema_max), warmup, float(rampup)
        # fp32 shadows whatever the weights' dtype: a 0.9999 decay is below bf16's resolution
        self.shadow = [t.detach().float().clone() for t in tensors]
        self.updates = 0

    @torch.no_grad()
    def update(self, tensors: list[Tensor]) -> float:
        """shadow = d * shadow + (1 - d) * current; returns the decay d used."""
        self._check(tensors)
        d = ema_decay(self.updates, self.ema_max, self.warmup, self.rampup)
        for s, t in zip(self.shadow, tensors):
            s.lerp_(t.detach().float(), 1.0 - d)
        self.updates += 1
        return d

    @torch.no_grad()
    def copy_to(self, tensors: list[Tensor]) -> None:
        """Overwrite ``tensors`` in place with the EMA values (performance alignment step (i))."""
        self._check(tensors)
        for s, t in zip(self.shadow, tensors):
            t.copy_(s.to(t.dtype))

    @contextlib.contextmanager
    def swapped_into(self, tensors: list[Tensor]):
        """The EMA values written into ``tensors`` for the duration, their own values restored after (e.g. to
        read out consolidated EMA weights through an engine without disturbing training)."""
        self._check(tensors)
        raw = [t.detach().clone() for t in tensors]
        self.copy_to(tensors)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, r in zip(tensors, raw):
                    t.copy_(r)

    def state_dict(self) -> dict:
        """Shadows (on CPU) and the update count, for this rank's checkpoint file."""
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates,
                "ema_max": self.ema_max, "warmup": self.warmup, "rampup": self.rampup}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (same tensor list as this EMA was built on)."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA checkpoint does not match the generator's parameter tensors (count or shapes)")
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)
        self.updates = int(state["updates"])

    def _check(self, tensors: list[Tensor]) -> None:
        if len(tensors) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(tensors, self.shadow)):
            raise ValueError("EMA: the tensors differ in count or shape from the ones it was built on")
