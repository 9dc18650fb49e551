"""Generator initialisation by regression onto the teacher's PF-ODE noise -> token map (an option before CSD).

Each conditional of the teacher is a mixture of point masses on the codes, so its probability-flow ODE has a
closed-form velocity (:func:`dd2dist.latent.posterior`). Integrating it from t = 1 to ~0 carries a Gaussian noise
vector eps_i to one code, and over eps_i ~ N(0, I) each code comes out with exactly the teacher's probability.
Running the teacher's own sampler with that rule in place of the multinomial draw (token i from eps_i and the
prefix already chosen) gives (noise sequence, token sequence) pairs whose tokens are distributed as teacher
samples. Token i is then a deterministic function of eps_<=i, which is what the one-step generator computes
(its backbone reads eps_<i, its head eps_i), so the generator can be *regressed* onto the pairs: the
noise -> data construction of Distilled Decoding 1, used here as a starting point for CSD.

Why (docs/method.md §12.2; measured on the digits LlamaGen teacher): after the stage-1 (GTS) start, the generator's
one-step output is the posterior mean of each position, and CSD spends thousands of steps spreading it over the
codes (per-position marginal TV 0.44 against the teacher's 0.145 after 600 steps). Regression puts the right mass on
each code from the start; CSD then only sharpens what regression blurs at the region boundaries.

Pure torch: the teacher is any :class:`ARTeacher` (or a ZeRO-3 teacher's module, whose sampler is collective).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dd2dist.conditions import Cond, Sampling, TokenPicker
from dd2dist.latent import T_MIN, mixture_logits, posterior
from dd2dist.teachers.base import ARTeacher


def ode_times(num_steps: int, t_min: float = T_MIN) -> list[float]:
    """The S + 1 integration times, uniform from 1 down to ``t_min``."""
    if num_steps < 1:
        raise ValueError(f"stage2.ode_steps must be >= 1, got {num_steps}")
    return [1.0 - (1.0 - t_min) * k / num_steps for k in range(num_steps + 1)]


def pf_ode_codes(log_probs: Tensor, codebook: Tensor, eps: Tensor, num_steps: int, t_min: float = T_MIN) -> Tensor:
    """Ids (B, n) that the teacher's PF-ODE carries ``eps`` (B, n, Ce) to, for per-token mixtures ``log_probs``
    (B, n, V) over ``codebook`` (V, Ce). fp32; ``num_steps`` Heun steps on :func:`ode_times`, then the code of
    highest posterior weight at ``t_min`` (filtered codes, -inf in ``log_probs``, are never chosen).

    Heun, not Euler: on a 16-code test mixture 8 Heun steps (16 velocity evaluations) match the code probabilities
    to sampling noise (TV 0.013 over 20k draws), where 64 Euler steps still leave 0.014 and 16 leave 0.034. Matching
    the probabilities is not enough for a regression target, though: the map itself must have converged, and with
    close codes it needs more steps (see :func:`teacher_ode_agreement`).
    """
    if log_probs.shape[:2] != eps.shape[:2] or log_probs.shape[-1] != codebook.shape[0]:
        raise ValueError(f"pf_ode_codes: log_probs {tuple(log_probs.shape)}, eps {tuple(eps.shape)} and codebook "
                         f"{tuple(codebook.shape)} do not match")
    lp, cb, z = log_probs.float(), codebook.float(), eps.float()

    def velocity(x: Tensor, t: float) -> Tensor:
        return posterior(lp, cb, x, t, t_min=t_min).velocity

    times = ode_times(num_steps, t_min)
    for t_now, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_now
        v_now = velocity(z, t_now)
        z = z + 0.5 * dt * (v_now + velocity(z + dt * v_now, t_next))
    B, n, Ce = z.shape
    t_end = torch.full((B * n,), times[-1], device=z.device)
    logits = mixture_logits(lp.reshape(B * n, -1), cb, (cb * cb).sum(-1), z.reshape(B * n, Ce), t_end)
    return logits.argmax(-1).view(B, n)


def ode_picker(eps: Tensor, codebook: Tensor, num_steps: int, t_min: float = T_MIN) -> TokenPicker:
    """A sampler ``pick`` rule: the tokens of each AR step are the PF-ODE images of that step's slice of ``eps``
    (B, N, Ce)."""

    def pick(log_probs: Tensor, step: slice) -> Tensor:
        return pf_ode_codes(log_probs, codebook, eps[:, step], num_steps, t_min)

    return pick


@torch.no_grad()
def teacher_ode_tokens(
    teacher: ARTeacher, eps: Tensor, cond: Cond, sampling: Sampling, codebook: Tensor, num_steps: int
) -> Tensor:
    """The teacher's token ids (B, N) for noise ``eps`` (B, N, Ce): its KV-cached sampler with every draw replaced
    by the PF-ODE map. ``codebook`` is passed in (a ZeRO-3 teacher's own may be partitioned)."""
    if eps.dim() != 3 or eps.shape[1:] != (teacher.num_tokens, teacher.embed_dim):
        raise ValueError(f"eps must be (B, {teacher.num_tokens}, {teacher.embed_dim}), got {tuple(eps.shape)}")
    ids = teacher.sample(cond, sampling, pick=ode_picker(eps, codebook, num_steps))
    return ids.clone()  # leave inference mode's tensor type behind


@torch.no_grad()
def teacher_ode_agreement(teacher: ARTeacher, eps: Tensor, cond: Cond, sampling: Sampling, codebook: Tensor,
                          num_steps: int, ids: Tensor) -> float:
    """The fraction of tokens of ``ids`` (made by :func:`teacher_ode_tokens` at ``num_steps``) that 4x the steps
    reproduce along the teacher's chain, where a token that differs also changes the conditionals of every later one.
    One more sampler call (collective for a ZeRO-3 teacher).

    Why it matters: regression pairs made by an unconverged integrator are a noisy function of the noise. On the
    digits LlamaGen teacher (64 unit codes in R^8, closest pair 0.17 apart) 8 Heun steps agree with 128 on 80% of the
    first tokens and 49% of all tokens; 16 steps agree on 94%, 32 on 98.5% (``python jobs/benchmark.py odemap``).
    """
    ref = teacher_ode_tokens(teacher, eps, cond, sampling, codebook, 4 * num_steps)
    return float((ref == ids).float().mean())


def regression_loss(generator, eps: Tensor, cond: Cond, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Generator regression onto PF-ODE pairs: squared error of ``generate(eps)`` against the target code vectors
    (B, N, Ce), summed over channels and averaged over tokens (fp32). It fits the map before a soft-snap output layer
    (``student.generator_snap``): through the snap a token in the wrong code's cell has a saturated, near-zero
    gradient."""
    q = generator.generate(eps, cond, snap=False).float()
    loss = (q - target.float()).pow(2).sum(-1).mean()
    return loss, {"regression_loss": loss.detach()}
