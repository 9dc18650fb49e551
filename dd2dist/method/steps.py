"""One DD2 optimizer step's loss for each role: which batch it draws, which nets it runs, which loss it takes.

The trainer hands a :class:`StepContext` and gets ``(loss, metrics, batch_size)`` back; what the context holds is
what the trainer owns (nets by role, the teacher, the batch source, the counters). Every random draw comes from the
batch source's generators, seeded by (seed, rank, iteration, purpose), so a step is a pure function of its context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dd2dist.method.losses import categorical_kl_loss, csd_loss, fcs_loss, gts_loss, snap_to_codes
from dd2dist.method.ode_init import regression_loss
from dd2dist.method.schedule import Phase

StepResult = tuple[Tensor, dict[str, Tensor], int]


@dataclass(frozen=True)
class StepContext:
    """What one micro-batch of one step may use.

    ``net(role)`` is the callable module of that role's network (ZeRO-3: calls routed through forward; a head-only
    role gets the whole student, frozen backbone included). ``batches`` is a
    :class:`dd2dist.train.batches.BatchSource`.
    """

    cfg: Any
    phase: Phase
    iteration: int
    phase_iter: int
    micro: int
    teacher: Any
    codebook: Tensor
    batches: Any
    net: Callable[[str], Any]

    def generator(self, purpose: str) -> torch.Generator:
        return self.batches.generator(self.iteration, purpose)


def gts_step(role: str) -> Callable[[StepContext], StepResult]:
    """Stage 1: the student regresses the teacher's closed-form velocity on teacher sequences."""

    def step(ctx: StepContext) -> StepResult:
        x0, cond, lp = ctx.batches.stage1(ctx.iteration, ctx.micro)
        loss, m = gts_loss(ctx.net(role), ctx.teacher, ctx.codebook, x0, cond, ctx.cfg.teacher.sampling,
                           ctx.generator(f"gts/{ctx.micro}"), t_min=ctx.cfg.stage1.t_min, teacher_log_probs=lp)
        return loss, m, x0.shape[0]

    return step


def regression_step(ctx: StepContext) -> StepResult:
    """The generator's PF-ODE regression start (dd2dist.method.ode_init)."""
    eps, cond, ids = ctx.batches.ode_pairs(ctx.iteration, ctx.phase_iter, ctx.micro, ctx.teacher)
    loss, m = regression_loss(ctx.net("generator"), eps, cond, ctx.codebook[ids])
    return loss, m, eps.shape[0]


def guidance_base_log_probs(cfg, teacher, codebook: Tensor, q: Tensor, cond,
                            snapped: Tensor | None = None) -> Tensor | None:
    """The teacher's log-probs a guidance network built on the teacher (``stage2.guidance_base="teacher"``) adds its
    correction to, on the prefix CSD gives the teacher (``stage2.teacher_prefix``), so that ψ's base and CSD's
    teacher are the same function; None for the paper's guidance network. ``snapped``: q's nearest codes if known."""
    s2 = cfg.stage2
    if s2.guidance_base != "teacher":
        return None
    if s2.teacher_prefix == "snap":
        q = snap_to_codes(q, codebook, teacher.family) if snapped is None else snapped
    with torch.no_grad():
        return teacher.log_probs(q.float(), cond, cfg.teacher.sampling)


def guidance_step(ctx: StepContext) -> StepResult:
    """FCS: the guidance net fits the generator's current samples (with ``stage2.guidance_base="teacher"``, as a
    correction to the teacher's closed-form velocity on the prefix CSD gives the teacher)."""
    s2 = ctx.cfg.stage2
    generator, guidance = ctx.net("generator"), ctx.net("guidance")
    eps, cond = ctx.batches.stage2(ctx.iteration, ctx.micro, "guidance")
    with torch.no_grad():
        q = generator.generate(eps, cond)
    prefix = snap_to_codes(q, ctx.codebook, ctx.teacher.family) if s2.guidance_prefix == "snap" else None
    base_lp = guidance_base_log_probs(ctx.cfg, ctx.teacher, ctx.codebook, q, cond, snapped=prefix)
    loss, m = fcs_loss(guidance, q, cond, ctx.generator(f"fcs/{ctx.micro}"), num_samples=s2.fcs_samples,
                       t_min=s2.fcs_t_min, prefix=prefix, base_log_probs=base_lp, codebook=ctx.codebook)
    return loss, m, eps.shape[0]


def generator_step(ctx: StepContext) -> StepResult:
    """CSD; with ``stage2.regression_weight`` the noise comes from PF-ODE pairs, whose teacher tokens anchor the
    generator's map through an added regression term."""
    s2 = ctx.cfg.stage2
    generator, guidance = ctx.net("generator"), ctx.net("guidance")
    anchor = s2.regression_weight > 0
    if anchor:
        eps, cond, ids = ctx.batches.ode_pairs(ctx.iteration, ctx.phase_iter, ctx.micro, ctx.teacher,
                                               stride=ctx.phase.guidance_per_generator + 1)
    else:
        eps, cond = ctx.batches.stage2(ctx.iteration, ctx.micro, "generator")
    q = generator.generate(eps, cond)
    loss, m = csd_loss(q, ctx.teacher, guidance, ctx.codebook, cond, ctx.cfg.teacher.sampling,
                       ctx.generator(f"csd/{ctx.micro}"), kind=s2.csd_loss, alpha=s2.csd_alpha, t_min=s2.csd_t_min,
                       t_max=s2.csd_t_max, teacher_prefix=s2.teacher_prefix, guidance_prefix=s2.guidance_prefix,
                       guidance_base=s2.guidance_base)
    if anchor:
        reg = (q.float() - ctx.codebook[ids]).pow(2).sum(-1).mean()
        loss = loss + s2.regression_weight * reg
        m = {**m, "regression_loss": reg.detach()}
    return loss, m, eps.shape[0]


def categorical_generator_step(ctx: StepContext) -> StepResult:
    """A categorical generator's stage-2 step: the exact per-position KL to the teacher given its own prefix."""
    eps, cond = ctx.batches.stage2(ctx.iteration, ctx.micro, "generator")
    loss, m = categorical_kl_loss(ctx.net("generator"), ctx.teacher, eps, cond, ctx.cfg.teacher.sampling,
                                  ctx.cfg.stage2.categorical_divergence)
    return loss, m, eps.shape[0]
