"""Categorical generator outputs: each position's token is drawn from its code distribution by the noise itself.

A generator with ``student.generator_output: categorical`` ends in code log-probs ``log_softmax(logits_i)`` (its
posterior head's code logits on the backbone features of the earlier noise) and outputs the code that the inverse
CDF of ``softmax(logits_i)`` picks at ``u_i = Phi(eps_i[0])``, the first coordinate of that position's own noise
mapped to a uniform. Given the noise of earlier AR steps, token i is then distributed exactly as ``softmax(logits_i)``:
the generator's conditional is known in closed form, which is what the exact stage-2 loss
(:func:`dd2dist.method.losses.categorical_kl_loss`) needs.

The order in which the CDF runs over the codes does not change that distribution, but it decides how the token
varies with the noise, and later positions must read each earlier token back from its noise. In the codes' index
order, neighbouring uniforms pick unrelated codes. In the principal order (:func:`principal_order`: the codes sorted
along the codebook's first principal axis), neighbouring uniforms pick codes that lie close along that axis, so what
a later position has to recover is a smoother function of the earlier noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def inverse_cdf_pick(probs: Tensor, u: Tensor) -> Tensor:
    """Code ids (...) picked by the inverse CDF of ``probs`` (..., V) at uniforms ``u`` (...): id k with
    probability ``probs[..., k]`` when u ~ U(0, 1). fp64 cumulative sums, so that a V = 16384 CDF stays exact."""
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:].clamp_min(1e-300)
    ids = torch.searchsorted(cdf.contiguous(), u.double().unsqueeze(-1).contiguous(), right=True)[..., 0]
    return ids.clamp_max(probs.shape[-1] - 1)


def noise_uniform(eps: Tensor) -> Tensor:
    """The uniform each position's pick uses: ``Phi(eps[..., 0])`` (B, N), fp64."""
    return 0.5 * (1.0 + (eps[..., 0].double() / math.sqrt(2.0)).erf())


CODE_ORDERS = ("index", "principal")


def principal_order(codebook: Tensor) -> Tensor:
    """Code ids (V,) sorted by their coordinate along the codebook's first principal axis (the axis's sign fixed so
    that its largest component is positive: the same order on every rank and after every load)."""
    centred = codebook.detach().double() - codebook.detach().double().mean(0)
    axis = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    axis = axis * axis[axis.abs().argmax()].sign()
    return (centred @ axis).argsort(stable=True)


def pick_codes(log_probs: Tensor, eps: Tensor, order: Tensor | None = None) -> Tensor:
    """Token ids (B, N) of noise ``eps`` (B, N, Ce) under a generator's code log-probs (B, N, V), the CDF running
    over the codes in ``order`` (None: their index order); no gradient."""
    probs = log_probs.detach().exp()
    if order is None:
        return inverse_cdf_pick(probs, noise_uniform(eps))
    return order[inverse_cdf_pick(probs[..., order], noise_uniform(eps))]
