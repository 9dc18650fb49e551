"""Codebook space, rectified-flow noising and the teacher's closed-form posterior: the heart of DD2.

Everything here is pure torch and computed in fp32 (docs/method.md §2-§3). Conventions:

* tokens live in the codebook-embedding space: ``x`` is (B, N, Ce), the codebook ``C`` is (V, Ce);
* rectified flow with t=0 data and t=1 noise: ``x_t = (1 - t) x0 + t eps``;
* for one position the teacher's next-token distribution p over codes is a mixture of Diracs at the code
  vectors; transported to time t it is a Gaussian mixture ``sum_j p_j N((1-t) c_j, t^2 I)``, whose posterior is

      w_j = softmax_j( log p_j - ||x - (1-t) c_j||^2 / (2 t^2) )
      x0_hat = sum_j w_j c_j,   v = (x - x0_hat) / t,   score = -(x - (1-t) x0_hat) / t^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dd2dist.conditions import Sampling

T_MIN = 0.02  # default floor of t (the score scales like 1/t^2); callers that draw t lower pass their own t_min
DEFAULT_MAX_CHUNK_ELEMS = 1 << 24  # rows * V per posterior chunk: 64 MiB of fp32 logits

# ---------------------------------------------------------------------------------------------------------
# codebook space
# ---------------------------------------------------------------------------------------------------------


def embed(ids: Tensor, codebook: Tensor) -> Tensor:
    """ids (...) -> code vectors (..., Ce)."""
    return codebook[ids]


def normalize_codebook(codebook: Tensor) -> Tensor:
    """Row-wise L2 normalisation (LlamaGen's VQ-16 uses unit-norm codes)."""
    return F.normalize(codebook.float(), dim=-1)


def nearest_code(x: Tensor, codebook: Tensor, normalized: bool = False, chunk: int = 4096) -> Tensor:
    """Nearest code id per vector, (..., Ce) -> (...).

    ``normalized=False``: plain L2 on the raw codebook (VAR). ``normalized=True``: both ``x`` and the codebook
    are L2-normalised first, i.e. the largest cosine (LlamaGen).
    """
    cb = codebook.float()
    flat = x.reshape(-1, x.shape[-1]).float()
    if normalized:
        cb, flat = F.normalize(cb, dim=-1), F.normalize(flat, dim=-1)
    cb_sq = (cb * cb).sum(-1)
    out = []
    for rows in flat.split(chunk):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
        out.append((cb_sq[None] - 2 * rows @ cb.T).argmin(-1))
    return torch.cat(out).reshape(x.shape[:-1]) if out else flat.new_zeros(x.shape[:-1], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# rectified flow
# ---------------------------------------------------------------------------------------------------------


def _bt(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-token time (B, N) (or scalar) against (B, N, Ce)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t[..., None] if t.dim() == like.dim() - 1 else t


def add_noise(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _bt(t, x0)
    return (1 - t) * x0 + t * eps


def x0_to_velocity(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """v = dx/dt = (x_t - x0) / t (pointing toward noise)."""
    return (x_t - x0) / _bt(t, x_t)


def velocity_to_x0(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """x0 = x_t - t v."""
    return x_t - _bt(t, x_t) * v


def x0_to_score(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """score = -(x_t - (1 - t) x0) / t^2."""
    t = _bt(t, x_t)
    return -(x_t - (1 - t) * x0) / (t * t)


def velocity_to_score(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """score = -((1 - t) v + x_t) / t."""
    t = _bt(t, x_t)
    return -((1 - t) * v + x_t) / t


def score_to_velocity(x_t: Tensor, s: Tensor, t: Tensor | float) -> Tensor:
    """v = -(t s + x_t) / (1 - t)."""
    t = _bt(t, x_t)
    return -(t * s + x_t) / (1 - t)


# ---------------------------------------------------------------------------------------------------------
# the closed-form teacher posterior
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Posterior:
    """Closed-form teacher quantities at (x_t, t): denoised mean, velocity and score, all (B, N, Ce) fp32."""

    x0: Tensor
    velocity: Tensor
    score: Tensor
    t: Tensor  # the clamped times actually used, (B, N)


def mixture_logits(log_probs: Tensor, codebook: Tensor, cb_sq: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """Unnormalised log-weights of each code given x_t, R flattened rows: log_probs (R, V), x (R, Ce), t (R,)
    -> (R, V); ``cb_sq`` is the codebook's squared norms (V,)."""
    a = (1 - t)[:, None]
    inv2t2 = 1.0 / (2 * t * t)[:, None]
    # -||x - a c||^2 / (2 t^2) up to a per-row constant: (2 a x.c - a^2 ||c||^2) / (2 t^2)
    return log_probs + (2 * a * (x @ codebook.T) - (a * a) * cb_sq[None]) * inv2t2


def _posterior_rows(log_probs: Tensor, codebook: Tensor, cb_sq: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """x0_hat for R flattened rows: log_probs (R, V), x (R, Ce), t (R,) -> (R, Ce)."""
    return torch.softmax(mixture_logits(log_probs, codebook, cb_sq, x, t), dim=-1) @ codebook


def posterior(
    log_probs: Tensor,
    codebook: Tensor,
    x_t: Tensor,
    t: Tensor | float,
    t_min: float = T_MIN,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> Posterior:
    """Closed-form posterior of the teacher's per-position mixture (docs/method.md §3.1, Eq.1).

    Args:
        log_probs: (B, N, V) teacher log-probs (after CFG/top-k/top-p; -inf for filtered codes).
        codebook: (V, Ce) code vectors of the DD2 latent space.
        x_t: (B, N, Ce) noisy tokens.
        t: (B, N) per-token times (or a scalar), clamped to ``[t_min, 1]``.

    Computed in fp32 as a matmul against the codebook (never a (B, N, V, Ce) tensor), in chunks of positions
    of at most ``max_chunk_elems`` logits. When gradients are needed the chunks are checkpointed, so backward
    recomputes each chunk and memory stays bounded; gradients flow to ``x_t`` (and to ``log_probs`` and
    ``codebook`` if they require them).
    """
    B, N, Ce = x_t.shape
    V = codebook.shape[0]
    if log_probs.shape != (B, N, V):
        raise ValueError(f"log_probs has shape {tuple(log_probs.shape)}, expected {(B, N, V)} from x_t and codebook")
    tt = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
    tt = tt.expand(B, N) if tt.dim() < 2 else tt
    tt = tt.float().clamp(min=t_min, max=1.0)
    x = x_t.float()
    cb = codebook.float()
    cb_sq = (cb * cb).sum(-1)
    lp, xf, tf = log_probs.float().reshape(B * N, V), x.reshape(B * N, Ce), tt.reshape(B * N)
    rows = max(1, max_chunk_elems // max(V, 1))
    needs_grad = torch.is_grad_enabled() and any(z.requires_grad for z in (log_probs, codebook, x_t))
    parts = []
    for s in range(0, B * N, rows):
        args = (lp[s : s + rows], cb, cb_sq, xf[s : s + rows], tf[s : s + rows])
        if needs_grad and B * N > rows:
            parts.append(checkpoint(_posterior_rows, *args, use_reentrant=False))
        else:
            parts.append(_posterior_rows(*args))
    x0 = torch.cat(parts).reshape(B, N, Ce)
    return Posterior(x0=x0, velocity=x0_to_velocity(x, x0, tt), score=x0_to_score(x, x0, tt), t=tt)


def posterior_mean(log_probs: Tensor, codebook: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """The teacher's denoised mean x0_hat (B, N, Ce) for log_probs (B,N,V), codebook (V,Ce), x_t (B,N,Ce), t (B,N)."""
    return posterior(log_probs, codebook, x_t, t).x0


# ---------------------------------------------------------------------------------------------------------
# logit processing shared by every teacher
# ---------------------------------------------------------------------------------------------------------


def guidance_weights(sampling: Sampling, step_of_token: Tensor, num_steps: int) -> Tensor:
    """Per-token CFG weight w (N,), with guided logits = uncond + w (cond - uncond).

    With s = ``sampling.guidance_scale``: ``constant`` (LlamaGen): w = s. ``var_linear`` (VAR):
    w_k = 1 + s * k / (S - 1) for AR step k of S, which is VAR's ``(1 + g) cond - g uncond`` with g = s * k / (S - 1).
    """
    steps = step_of_token.float()
    if sampling.guidance_schedule == "constant":
        return torch.full_like(steps, float(sampling.guidance_scale))
    if sampling.guidance_schedule == "var_linear":
        ramp = steps / (num_steps - 1) if num_steps > 1 else torch.zeros_like(steps)
        return 1.0 + float(sampling.guidance_scale) * ramp
    raise ValueError(
        f"sampling.guidance_schedule must be 'constant' or 'var_linear', got {sampling.guidance_schedule!r}")


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Set logits below the k-th largest to -inf (ties with the k-th are kept). k <= 0 or k >= V: no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep a code iff the probability mass of the codes ranked strictly above it is < p.

    This keeps the smallest top set whose mass reaches p (always at least the top code). p >= 1: no-op.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_above = probs.cumsum(-1) - probs
    remove_sorted = mass_above >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    cond_logits: Tensor, uncond_logits: Tensor | None, weights: Tensor | float, sampling: Sampling
) -> Tensor:
    """CFG, temperature, top-k, top-p, then log-softmax -> fp32 log-probs (filtered codes are -inf).

    Args:
        cond_logits, uncond_logits: (B, n, V) raw logits of the conditional / null rows (uncond may be None when
            every weight is 1).
        weights: per-token CFG weights (n,) from :func:`guidance_weights` (or a scalar).
    """
    logits = cond_logits.float()
    w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
    if uncond_logits is not None:
        u = uncond_logits.float()
        logits = u + (w[:, None] if w.dim() == 1 else w) * (logits - u)
    elif bool((w != 1).any()):
        raise ValueError("CFG weights differ from 1 but no unconditional logits were given")
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    logits = filter_top_k(logits, sampling.top_k)
    logits = filter_top_p(logits, sampling.top_p)
    return torch.log_softmax(logits, dim=-1)
