"""The three DD2 losses as pure functions (docs/method.md §7-§9): GTS (stage 1), FCS (guidance), CSD (generator),
and the exact KL that replaces CSD and FCS for a generator with categorical outputs.

Conventions: tokens are codebook vectors (B, N, Ce); rectified flow ``x_t = (1 - t) x0 + t eps`` with one time per
position (B, N); every net predicts velocity ``v = dx/dt`` and ``x0 = x_t - t v``. Random draws come from the
``torch.Generator`` passed in (see :mod:`dd2dist.method.seeding`). Reductions run in fp32. Each function returns
``(loss, metrics)`` with ``metrics`` a dict of detached scalar tensors (no host sync here). Under a bf16 autocast
the nets run in bf16 while the closed-form posterior and every reduction stay fp32.

Nets are passed as modules (``engine.module``): the caller sets train/eval and requires_grad per phase; these
functions only decide where ``no_grad`` and ``detach`` go.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from dd2dist.conditions import Cond, Sampling
from dd2dist.latent import add_noise, nearest_code, posterior, velocity_to_x0
from dd2dist.teachers.base import ARTeacher


def closed_form(lp: Tensor, codebook: Tensor, x_t: Tensor, t: Tensor, t_min: float):
    """The teacher posterior, always in fp32: autocast (bf16 runs) must not touch its softmax-of-distances matmul.

    ``t_min`` is the floor the caller drew ``t`` from: the posterior must use the very times ``x_t`` was built with
    (clamping them higher would rescale the target by t / t_min without a word)."""
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        return posterior(lp.float(), codebook.float(), x_t.float(), t, t_min=t_min)


def uniform_times(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator, device) -> Tensor:
    """t ~ U(low, high) of ``shape``, fp32, drawn from ``gen``."""
    return low + (high - low) * torch.rand(shape, generator=gen, device=device, dtype=torch.float32)


def gaussian(like: Tensor, gen: torch.Generator) -> Tensor:
    """N(0, I) noise shaped like ``like`` (fp32), drawn from ``gen``."""
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def gts_loss(
    student,
    teacher: ARTeacher,
    codebook: Tensor,
    x0: Tensor,
    cond: Cond,
    sampling: Sampling,
    gen: torch.Generator,
    t_min: float = 0.02,
    teacher_log_probs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-1 Ground-Truth-Score loss in velocity space (docs/method.md §7, §12.5).

    ``x0`` is a clean teacher-sampled sequence (B, N, Ce). The student is teacher-forced on it; per position
    t ~ U(t_min, 1) and eps ~ N(0, I) give x_t, and the head regresses the teacher's closed-form velocity at x_t
    (no gradient), computed from the teacher's log-probs under the distillation-target ``sampling``
    (``teacher_log_probs`` may pass them in when the sampler already returned them).

    Velocity-space MSE is the score-space MSE of Eq.6 reweighted by (t / (1 - t))^2, i.e. the parameterisation
    the paper trains; it also stays bounded as t -> 0 where the score blows up.
    """
    x0 = x0.float()
    B, N, _ = x0.shape
    t = uniform_times((B, N), t_min, 1.0, gen, x0.device)
    eps = gaussian(x0, gen)
    x_t = add_noise(x0, eps, t)
    with torch.no_grad():
        lp = teacher_log_probs if teacher_log_probs is not None else teacher.log_probs(x0, cond, sampling)
        target = closed_form(lp, codebook, x_t, t, t_min).velocity
    feats = student.features(x0, cond)
    v = student.velocity(x_t, t, feats).float()
    loss = (v - target).pow(2).mean()
    return loss, {"loss": loss.detach(), "target_v_rms": target.pow(2).mean().sqrt()}


def snap_to_codes(x: Tensor, codebook: Tensor, family: str) -> Tensor:
    """Each token replaced by its nearest code vector (the family's metric), same dtype; no gradient."""
    with torch.no_grad():
        return codebook[nearest_code(x.float(), codebook, normalized=family == "llamagen")].to(x.dtype)


def fcs_loss(
    guidance,
    q: Tensor,
    cond: Cond,
    gen: torch.Generator,
    num_samples: int = 4,
    t_min: float = 0.02,
    prefix: Tensor | None = None,
    base_log_probs: Tensor | None = None,
    codebook: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Guidance (fake-score) loss on detached generator samples (docs/method.md §8, velocity form).

    One teacher-forced backbone pass on sg(q) (or on ``prefix``, e.g. its nearest codes, see
    ``stage2.guidance_prefix``), then ``num_samples`` independent (t, eps) draws per position through the head
    (MAR's multi-sample trick, m=4); target velocity ``eps - q``; t ~ U(t_min, 1).

    ``base_log_probs`` (B, N, V), with ``codebook`` (``stage2.guidance_base="teacher"``): ψ's velocity is the
    closed-form velocity of these log-probs (the teacher's on the generator's prefix) plus ψ's MLP head alone, so
    the head fits only the generator's difference from the teacher.
    """
    q = q.detach().float()
    B, N, Ce = q.shape
    m = int(num_samples)
    if m < 1:
        raise ValueError(f"stage2.fcs_samples must be >= 1, got {m}")
    feats = guidance.features(q if prefix is None else prefix.detach(), cond)
    t = uniform_times((m, B, N), t_min, 1.0, gen, q.device)
    eps = torch.randn((m, B, N, Ce), generator=gen, device=q.device, dtype=torch.float32)
    qm = q.unsqueeze(0).expand(m, B, N, Ce)
    x_t = add_noise(qm, eps, t)
    fm = feats.unsqueeze(0).expand(m, *feats.shape).reshape(m * B, N, -1)
    x_t, t = x_t.reshape(m * B, N, Ce), t.reshape(m * B, N)
    metrics = {}
    if base_log_probs is None:
        lp = guidance.code_log_probs(feats)  # a posterior head's code log-probs depend on the features only: once
        lpm = None if lp is None else lp.unsqueeze(0).expand(m, *lp.shape).reshape(m * B, N, -1)
        v = guidance.velocity(x_t, t, fm, lpm).float()
    else:
        if codebook is None:
            raise ValueError("fcs_loss: base_log_probs needs the codebook they are over")
        lpm = base_log_probs.detach().unsqueeze(0).expand(m, *base_log_probs.shape).reshape(m * B, N, -1)
        with torch.no_grad():
            v_base = closed_form(lpm, codebook, x_t, t, t_min).velocity
        correction = guidance.correction(x_t, t, fm).float()
        v = v_base + correction
        metrics["correction_rms"] = correction.detach().pow(2).mean().sqrt()
    loss = (v.reshape(m, B, N, Ce) - (eps - qm)).pow(2).mean()
    return loss, {"loss": loss.detach(), **metrics}


def csd_loss(
    q: Tensor,
    teacher: ARTeacher,
    guidance,
    codebook: Tensor,
    cond: Cond,
    sampling: Sampling,
    gen: torch.Generator,
    kind: Literal["sid", "dmd"] = "sid",
    alpha: float = 1.0,
    t_min: float = 0.02,
    t_max: float = 0.96,
    teacher_prefix: Literal["continuous", "snap"] = "continuous",
    guidance_prefix: Literal["continuous", "snap"] = "continuous",
    guidance_base: Literal["none", "teacher"] = "none",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Conditional Score Distillation loss of the generator (docs/method.md §9).

    ``q`` (B, N, Ce) is the generator output *with* its graph. The prefix is stop-gradient: the teacher's
    log-probs and the guidance backbone features are computed under ``no_grad`` on sg(q). Per position,
    t ~ U(t_min, t_max) (SiD's t_max ≈ 0.96; docs/method.md §12.6) and x_t = (1 - t) q + t eps keep the graph to
    q_i, which reaches (a) the explicit q_i in the loss and (b) the closed-form teacher x̂0 (autograd through the softmax
    mixture) and ψ's head (ψ's parameters must be frozen by the caller). ``w = sg(mean |q - x̂0_Φ|)`` per
    sample over all tokens and channels.

    ``kind="sid"``: per token ``(x̂0_Φ - x̂0_ψ)ᵀ[(x̂0_Φ - q) - α (x̂0_Φ - x̂0_ψ)] / w``, summed over channels and
    averaged over tokens (α=1 gives ``(x̂0_Φ - x̂0_ψ)ᵀ(x̂0_ψ - q) / w``).
    ``kind="dmd"`` (fallback, docs/method.md §9.3): ``0.5 ||q - sg(q - (x̂0_ψ - x̂0_Φ) / w)||²``, the DMD/KL
    gradient without backpropagating through either score model.

    ``teacher_prefix="snap"`` conditions the teacher on the nearest codes of sg(q) instead of sg(q) itself (an
    option of docs/method.md §12.1; the default feeds the continuous outputs): the teacher's conditionals are only
    trained on code prefixes, and what is finally scored is the quantised sequence. ``guidance_prefix="snap"``
    does the same for ψ's backbone (it must match how ψ is trained, :func:`fcs_loss` ``prefix``); with both
    snapped, CSD compares the two conditionals given the quantised prefix, whose product is the quantised joint.
    The gradient path is unchanged (the prefix is stop-gradient either way).

    ``guidance_base="teacher"``: ψ's velocity is the teacher's closed-form velocity at the same x_t plus ψ's MLP
    head (:func:`fcs_loss` ``base_log_probs``), so ``x̂0_Φ - x̂0_ψ = t · correction``: the generator moves only
    where ψ has measured a difference from the teacher.
    """
    if kind not in ("sid", "dmd"):
        raise ValueError(f"stage2.csd_loss must be 'sid' or 'dmd', got {kind!r}")
    for key, val in (("teacher_prefix", teacher_prefix), ("guidance_prefix", guidance_prefix)):
        if val not in ("continuous", "snap"):
            raise ValueError(f"stage2.{key} must be 'continuous' or 'snap', got {val!r}")
    if guidance_base not in ("none", "teacher"):
        raise ValueError(f"stage2.guidance_base must be 'none' or 'teacher', got {guidance_base!r}")
    B, N, _ = q.shape
    qf = q.float()
    q_sg = qf.detach()
    with torch.no_grad():
        # the given codebook: a ZeRO-3 teacher's own may be partitioned
        snapped = snap_to_codes(q_sg, codebook, teacher.family) if "snap" in (teacher_prefix, guidance_prefix) else q_sg
        lp = teacher.log_probs(snapped if teacher_prefix == "snap" else q_sg, cond, sampling)
        feats = guidance.features(snapped if guidance_prefix == "snap" else q_sg, cond)
    t = uniform_times((B, N), t_min, t_max, gen, q.device)
    eps = gaussian(qf, gen)
    with torch.set_grad_enabled(kind == "sid" and torch.is_grad_enabled()):
        x_t = add_noise(qf if kind == "sid" else q_sg, eps, t)
        real = closed_form(lp, codebook, x_t, t, t_min)
        x0_real = real.x0
        if guidance_base == "teacher":
            # x0 = x_t - t v with v = v_Φ + correction, written so that a zero correction gives exactly x̂0_Φ
            x0_fake = x0_real - t.unsqueeze(-1) * guidance.correction(x_t, t, feats).float()
        else:
            x0_fake = velocity_to_x0(x_t, guidance.velocity(x_t, t, feats).float(), t)
    w = (q_sg - x0_real.detach()).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    diff = x0_real - x0_fake
    if kind == "sid":
        per_token = (diff * ((x0_real - qf) - alpha * diff)).sum(-1) / w[..., 0]
        loss = per_token.mean()
    else:
        grad = (-diff / w).detach()
        loss = 0.5 * (qf - (q_sg - grad)).pow(2).sum(-1).mean()
    metrics = {
        "loss": loss.detach(),
        "score_gap": diff.detach().pow(2).sum(-1).mean(),
        "w": w.detach().mean(),
    }
    return loss, metrics


def target_kl(teacher_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """Per-position KL (B, N), fp32, from the teacher's target (codes it filters out: -inf, no mass) to
    ``log_probs``."""
    target = teacher_log_probs.float()
    p = target.exp()  # exp(-inf) = 0
    gap = (target - log_probs.float()).where(p > 0, torch.zeros_like(target))  # no -inf - finite on filtered codes
    return (p * gap).sum(-1)


# The log-prob a code the teacher filters out (top-k / top-p: -inf) counts as in the reverse KL: the smallest normal
# fp32 number's, so that mass put there costs a large but finite amount (and a finite gradient)
FILTERED_LOG_PROB = math.log(torch.finfo(torch.float32).tiny)
CATEGORICAL_DIVERGENCES = ("forward", "symmetric")  # stage2.categorical_divergence


def reverse_kl(teacher_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """Per-position KL (B, N), fp32, from ``log_probs`` to the teacher's target: the mode-seeking direction, which
    charges the generator for every code it draws more often than the teacher would."""
    q = log_probs.float()
    return (q.exp() * (q - teacher_log_probs.float().clamp_min(FILTERED_LOG_PROB))).sum(-1)


def categorical_divergence(teacher_log_probs: Tensor, log_probs: Tensor, kind: str = "forward") -> Tensor:
    """Per-position divergence (B, N), fp32, of the generator's ``log_probs`` from the teacher's target: ``forward``
    KL(target || generator), or ``symmetric``, the mean of both KL directions (half Jeffreys' divergence).

    Both are zero exactly when the two conditionals are equal; they differ in how fast a generator gets there. The
    forward KL's gradient on a code is only the generator's excess mass on it, so mass left on the many codes the
    teacher almost never draws drains slowly, and within a budget of steps the generator keeps drawing tokens the
    teacher finds unlikely. The reverse KL charges that mass by its log-ratio to the teacher's; alone it drops codes
    the teacher draws. docs/method.md §12.16 measures the three."""
    if kind == "forward":
        return target_kl(teacher_log_probs, log_probs)
    if kind == "symmetric":
        return 0.5 * (target_kl(teacher_log_probs, log_probs) + reverse_kl(teacher_log_probs, log_probs))
    raise ValueError(f"categorical divergence must be one of {CATEGORICAL_DIVERGENCES}, got {kind!r}")


def categorical_kl(generator, teacher: ARTeacher, eps: Tensor, cond: Cond, sampling: Sampling,
                   divergence: str = "forward") -> tuple[Tensor, Tensor]:
    """A categorical generator's per-position divergence (B, N), fp32, from the teacher's target given the tokens it
    picks from ``eps`` to its own conditional (:func:`categorical_divergence`), and its code log-probs (B, N, V) (see
    :func:`categorical_kl_loss`)."""
    log_probs, ids = generator.generator_outputs(eps, cond)
    with torch.no_grad():
        target = teacher.log_probs(ids, cond, sampling)
    return categorical_divergence(target, log_probs, divergence), log_probs


def categorical_kl_loss(
    generator,
    teacher: ARTeacher,
    eps: Tensor,
    cond: Cond,
    sampling: Sampling,
    divergence: str = "forward",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage 2 for a generator with categorical outputs (``student.generator_output: categorical``).

    The generator picks its tokens from its own code log-probs at the noise's uniforms
    (:mod:`dd2dist.nets.categorical`), so its conditional at every position given the earlier noise is known
    exactly. The loss is, per sequence, the sum over positions of KL(teacher target given the generator's own
    prefix || the generator's conditional), averaged over the batch: what CSD estimates through a learned guidance
    network for a continuous generator is here exact, so no guidance network is needed. Zero only when every
    position's conditional equals the teacher's given the prefix the generator produced, i.e. when the two joints are
    equal. Gradients reach the log-probs only; the prefix the teacher reads is the picked codes, held fixed.
    ``divergence`` (``stage2.categorical_divergence``): that KL, or the mean of it and the reverse KL
    (:func:`categorical_divergence`); the loss and the logged ``kl_first`` / ``kl_last`` are then that divergence.
    """
    kl, log_probs = categorical_kl(generator, teacher, eps, cond, sampling, divergence)  # (B, N), (B, N, V)
    loss = kl.sum(-1).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return loss, {"loss": loss.detach(), "kl_first": kl[:, 0].mean().detach(), "kl_last": kl[:, -1].mean().detach(),
                  "entropy": entropy.detach()}
