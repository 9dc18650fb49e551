"""What a teacher is asked for: the condition of each row (:class:`Cond`), the rule that turns its logits into a
sampling distribution (:class:`Sampling`) and the per-step token choice (:data:`TokenPicker`); and the two
orders of class labels that evaluation and benchmarks condition on (:func:`cyclic_labels`,
:func:`class_major_labels`).

Teachers, the closed-form posterior (``dd2dist.latent``), the config schema, the data layer and the losses all
speak these types, so they live below all of them: this module imports nothing from dd2dist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor

# How a sampler chooses the ids of one AR step: (log-probs (B, n, V) of the step's n tokens after CFG and
# filtering, the step's slice of the N tokens) -> ids (B, n). The default is a multinomial draw; the PF-ODE
# pairs of dd2dist.method.ode_init map fixed noise to each token instead.
TokenPicker = Callable[[Tensor, slice], Tensor]


@dataclass(frozen=True)
class Sampling:
    """How the teacher turns logits into a sampling distribution.

    ``guidance_scale`` (the classifier-free guidance scale s) is read by the teacher's own guidance rule
    (``guidance_schedule``):
      * ``"constant"`` (LlamaGen): ``logits = uncond + s * (cond - uncond)`` at every step; s=1 is off.
      * ``"var_linear"`` (VAR): ``logits = (1 + g_k) cond - g_k uncond`` with ``g_k = s * k / (S - 1)`` for
        AR step k of S; s=0 is off.
    Both are ``uncond + w_k (cond - uncond)``; :func:`dd2dist.latent.guidance_weights` returns w_k.
    Then temperature, top-k (0 = off), top-p (1.0 = off) are applied, as -inf masks.
    """

    guidance_scale: float = 1.0
    guidance_schedule: Literal["constant", "var_linear"] = "constant"
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0

    # Names these fields had in earlier configs and shard metadata: "cfg" read as the config everywhere else.
    # Readers of stored settings (the config loader, shard meta.json) map them to the current names.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"cfg": "guidance_scale", "cfg_schedule": "guidance_schedule"}

    def with_(self, **kw) -> Sampling:
        return replace(self, **kw)


@dataclass
class Cond:
    """The condition of a batch: class labels, or precomputed text features (left-padded) with their mask.

    The null condition (for CFG) is label ``num_classes`` for class models, and the teacher's learned null
    caption with the same mask for text models (see :meth:`ARTeacher.null_cond`).
    """

    labels: Tensor | None = None  # (B,) int64
    text: Tensor | None = None  # (B, T, Dt) float
    text_mask: Tensor | None = None  # (B, T) bool, True = valid slot

    @property
    def batch_size(self) -> int:
        for t in (self.labels, self.text):
            if t is not None:
                return t.shape[0]
        raise ValueError("Cond holds neither labels nor text")

    def to(self, device) -> Cond:
        mv = lambda t: None if t is None else t.to(device)
        return Cond(mv(self.labels), mv(self.text), mv(self.text_mask))

    def select(self, idx) -> Cond:
        sel = lambda t: None if t is None else t[idx]
        return Cond(sel(self.labels), sel(self.text), sel(self.text_mask))

    def repeat(self, n: int) -> Cond:
        """Each row repeated n times consecutively (row b -> rows b*n .. b*n+n-1)."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)
        return Cond(rep(self.labels), rep(self.text), rep(self.text_mask))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        def c(name):
            parts = [getattr(x, name) for x in conds]
            return None if parts[0] is None else torch.cat(parts, 0)

        return Cond(c("labels"), c("text"), c("text_mask"))


def cyclic_labels(num_samples: int, num_classes: int, start: int = 0, device=None) -> Tensor:
    """Class labels ``start, start + 1, ...`` modulo ``num_classes`` (int64): any window of them holds every class
    within one of the others, and consecutive windows continue the cycle."""
    return (torch.arange(num_samples, device=device) + start) % num_classes


def class_major_labels(num_classes: int, per_class: int, device=None) -> Tensor:
    """``per_class`` copies of each class in class order, ``0, 0, ..., 1, 1, ...`` (int64): one block per class,
    for per-class grids and per-class statistics."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)
