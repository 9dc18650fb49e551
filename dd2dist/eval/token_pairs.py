"""Pairwise token statistics: how well a sampler reproduces the *dependence* between positions.

Per-position marginals (:mod:`dd2dist.eval.token_marginals`) say nothing about how tokens co-occur; a product of the
teacher's marginals matches them exactly. The joint of every pair of positions (a, b), per class, does: it counts
how often codes (u, v) occur together at (a, b) among a sampler's tokens, and the total variation between two
samplers' pair tables, averaged over classes and pairs, is small only when the dependence is right too. Two draws
of the same sampler give the finite-sample floor of the number (the tables have V^2 cells, so it is far from 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_index(num_tokens: int) -> tuple[Tensor, Tensor]:
    """Positions (a, b) of every pair a < b, each (P,) with P = N (N - 1) / 2."""
    a, b = torch.triu_indices(num_tokens, num_tokens, offset=1)
    return a, b


def pair_counts(ids: Tensor, labels: Tensor, num_classes: int, vocab_size: int) -> Tensor:
    """(num_classes, P, V * V) float64 counts of codes (u, v) at positions (a, b) among the rows of each class.

    ``ids`` (M, N) token ids, ``labels`` (M,) class ids; pairs in :func:`pair_index` order, cell u * V + v.
    """
    if ids.dim() != 2 or labels.shape != ids.shape[:1]:
        raise ValueError(f"ids must be (M, N) and labels (M,), got {tuple(ids.shape)} and {tuple(labels.shape)}")
    ids, labels = ids.long().cpu(), labels.long().cpu()
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    a, b = pair_index(ids.shape[1])
    P, cells = a.shape[0], vocab_size * vocab_size
    cell = ids[:, a] * vocab_size + ids[:, b]  # (M, P)
    flat = (labels[:, None] * P + torch.arange(P)[None]) * cells + cell
    counts = torch.bincount(flat.flatten(), minlength=num_classes * P * cells)
    return counts.view(num_classes, P, cells).double()


def pair_tv(counts: Tensor, reference: Tensor) -> dict:
    """Total variation between the per-(class, pair) joint frequencies of two :func:`pair_counts` tensors.

    Classes absent from either side are left out. Returns ``mean`` (over classes and pairs) and ``by_distance``
    (the mean over pairs whose positions are d apart, d = 1 .. N - 1: where in the sequence the dependence is
    missed).
    """
    if counts.shape != reference.shape:
        raise ValueError(f"pair count tensors differ in shape: {tuple(counts.shape)} vs {tuple(reference.shape)}")
    totals, ref_totals = counts[:, 0].sum(-1), reference[:, 0].sum(-1)  # (C,)
    present = (totals > 0) & (ref_totals > 0)
    if not bool(present.any()):
        raise ValueError("no class has samples on both sides")
    p = counts[present] / totals[present, None, None]
    q = reference[present] / ref_totals[present, None, None]
    tv = 0.5 * (p - q).abs().sum(-1).mean(0)  # (P,), mean over classes
    P = tv.shape[0]
    num_tokens = int(round((1 + (1 + 8 * P) ** 0.5) / 2))
    a, b = pair_index(num_tokens)
    by_distance = [round(float(tv[(b - a) == d].mean()), 4) for d in range(1, num_tokens)]
    return {"mean": float(tv.mean()), "by_distance": by_distance}
