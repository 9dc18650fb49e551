"""``OptimSpec``: the optimizer settings of one trainable engine, shared by every engine implementation.

A leaf module (no torch, DeepSpeed or Ray import) so that the trainer, the method code and each engine read one
definition and one set of defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    # (parameter-name prefix, multiple): parameters whose name starts with the prefix step at that multiple of the
    # scheduled LR, e.g. a part of the network that starts from fresh weights beside one copied from the teacher
    lr_scales: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_start < 0:
            raise ValueError(f"OptimSpec: lr must be > 0 and lr_start >= 0, got lr={self.lr}, lr_start={self.lr_start}")
        if self.grad_accum < 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(
                f"OptimSpec: grad_accum >= 1, warmup_steps >= 0, grad_clip >= 0 required; got {self.grad_accum}, "
                f"{self.warmup_steps}, {self.grad_clip}"
            )

        for prefix, scale in self.lr_scales:
            if not prefix or scale <= 0:
                raise ValueError(f"OptimSpec: lr_scales needs a name prefix and a multiple > 0, got {(prefix, scale)}")

    def lr_at(self, n: int) -> float:
        if self.warmup_steps <= 0:
            return self.lr
        return self.lr_start + (self.lr - self.lr_start) * min(1.0, (n + 1) / self.warmup_steps)

    def adamw_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torch.optim.AdamW`` at step 0 (the engines move the LR per step themselves).

        Every engine builds its AdamW from this, so no engine can fall back on defaults of its own.
        """
        return {
            "lr": float(self.lr_at(0)),
            "betas": tuple(float(b) for b in self.betas),
            "weight_decay": float(self.weight_decay),
            "eps": float(self.eps),
        }


def param_groups(module, spec: OptimSpec) -> list[dict[str, Any]]:
    """``module``'s parameters as AdamW parameter groups, each with its ``lr_scale`` (engines set a group's LR to
    ``lr_scale`` x the scheduled LR): one group without ``spec.lr_scales``, else the unscaled parameters first, then
    one group per prefix (in ``spec.lr_scales`` order) that names any parameter. Refuses a prefix that names none."""
    named = list(module.named_parameters())
    groups = []
    taken: set[str] = set()
    for prefix, scale in spec.lr_scales:
        params = [(n, p) for n, p in named if n.startswith(prefix) and n not in taken]
        if not params:
            raise ValueError(f"OptimSpec.lr_scales: no parameter name starts with {prefix!r}")
        taken.update(n for n, _ in params)
        groups.append({"params": [p for _, p in params], "lr_scale": float(scale)})
    rest = [p for n, p in named if n not in taken]
    return [{"params": rest, "lr_scale": 1.0}] + groups
