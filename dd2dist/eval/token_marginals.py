"""How far a sampler's per-position token marginals are from the teacher's: a diagnostic beside FID.

A one-step generator can miss the teacher in two ways: the wrong token *marginal* at a position (which codes appear
there for a class, and how often), or the wrong *dependence* between positions. FID mixes both. This module
separates the first: it counts, per class and position, how often each code occurs among a sampler's (snapped)
tokens and compares that with the counts over the teacher-token shards by total variation. The teacher's own
samples measured the same way give the finite-sample floor of the number.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def class_position_counts(ids: Tensor, labels: Tensor, num_classes: int, vocab_size: int) -> Tensor:
    """(num_classes, N, vocab_size) float64 counts of code v at position p among the rows of class c.

    ``ids`` (B, N) token ids, ``labels`` (B,) class ids.
    """
    if ids.dim() != 2 or labels.shape != ids.shape[:1]:
        raise ValueError(f"ids must be (B, N) and labels (B,), got {tuple(ids.shape)} and {tuple(labels.shape)}")
    ids, labels = ids.long().cpu(), labels.long().cpu()
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    B, N = ids.shape
    counts = torch.zeros(num_classes, N, vocab_size, dtype=torch.float64)
    # accumulate=True: repeated (class, position, code) triples must add up, not overwrite each other
    counts.index_put_((labels[:, None].expand(B, N), torch.arange(N)[None].expand(B, N), ids),
                      torch.ones(B, N, dtype=torch.float64), accumulate=True)
    return counts


def shard_token_counts(tokens_dir: str | os.PathLike, num_classes: int, vocab_size: int) -> Tensor:
    """:func:`class_position_counts` over every sample of the teacher-token shards under ``tokens_dir`` (corrupt
    shards are skipped and counted by the reader, as in training)."""
    from dd2dist.data import DataStats, list_shards
    from dd2dist.data.tario import iter_shard_samples

    ids, labels = [], []
    for shard in list_shards(str(tokens_dir)):
        for sample in iter_shard_samples(shard, DataStats()):
            ids.append(torch.as_tensor(sample.tokens, dtype=torch.long).flatten())
            labels.append(int(sample.label))
    if not ids:
        raise FileNotFoundError(f"{tokens_dir}: no teacher-token samples to count")
    return class_position_counts(torch.stack(ids), torch.tensor(labels), num_classes, vocab_size)


def marginal_tv(counts: Tensor, reference: Tensor) -> dict:
    """Total variation between the per-(class, position) code frequencies of ``counts`` and ``reference``.

    Both are :func:`class_position_counts` tensors of one shape. Classes absent from either side are left out.
    Returns ``mean`` (over classes and positions), ``per_position`` (mean over classes) and ``classes`` (those
    compared).
    """
    if counts.shape != reference.shape:
        raise ValueError(f"count tensors differ in shape: {tuple(counts.shape)} vs {tuple(reference.shape)}")
    totals, ref_totals = counts.sum(-1), reference.sum(-1)  # (C, N)
    present = (totals[:, 0] > 0) & (ref_totals[:, 0] > 0)
    if not bool(present.any()):
        raise ValueError("no class has samples on both sides")
    p = counts[present] / totals[present, :, None]
    q = reference[present] / ref_totals[present, :, None]
    tv = 0.5 * (p - q).abs().sum(-1)  # (classes, N)
    return {"mean": float(tv.mean()), "per_position": [round(float(x), 4) for x in tv.mean(0)],
            "classes": [int(c) for c in torch.nonzero(present).flatten()]}
