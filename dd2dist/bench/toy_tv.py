"""Exact joints of enumerable teachers and total-variation distances of sample sets to them.

All distributions are per class over the V^N sequences, indexed as in
:func:`dd2dist.bench.toy_teacher.all_sequences`; a TV "of a run" is the mean over classes of the per-class TV
(every class gets the same number of samples, so this is also the TV of the joint over (class, sequence) with
uniform labels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dd2dist.bench.toy_teacher import all_sequences, sequence_index
from dd2dist.conditions import Cond, Sampling
from dd2dist.teachers.base import ARTeacher


@torch.no_grad()
def exact_joint(teacher: ARTeacher, sampling: Sampling | None, num_classes: int, chunk: int = 8192) -> Tensor:
    """(C, V^N) exact p(sequence | class) of ``teacher`` under ``sampling``: teacher-forced log-probs of every
    sequence, summed over positions (the AR factorisation), exponentiated."""
    seqs = all_sequences(teacher.vocab_size, teacher.num_tokens)
    out = torch.empty(num_classes, seqs.shape[0])
    for y in range(num_classes):
        for s in range(0, seqs.shape[0], chunk):
            ids = seqs[s : s + chunk]
            labels = torch.full((ids.shape[0],), y, dtype=torch.long)
            lp = teacher.log_probs(ids, Cond(labels=labels), sampling)
            out[y, s : s + chunk] = lp.gather(-1, ids[..., None])[..., 0].sum(-1).exp()
    return out


def tv(p: Tensor, q: Tensor) -> float:
    """Mean over classes of 0.5 * sum |p - q|, for (C, S) distributions (rows summing to 1)."""
    if p.shape != q.shape:
        raise ValueError(f"tv: distributions of shapes {tuple(p.shape)} and {tuple(q.shape)} differ")
    return float(0.5 * (p.double() - q.double()).abs().sum(-1).mean())


def empirical(ids: Tensor, labels: Tensor, vocab: int, num_classes: int) -> Tensor:
    """(C, V^N) per-class frequencies of id sequences ids (M, N) with class labels (M,)."""
    S = vocab ** ids.shape[1]
    flat = labels.long() * S + sequence_index(ids, vocab)
    counts = torch.bincount(flat, minlength=num_classes * S).reshape(num_classes, S).double()
    totals = counts.sum(-1, keepdim=True)
    if bool((totals == 0).any()):
        raise ValueError("empirical: some class has no samples")
    return counts / totals


def marginal_product(joint: Tensor, vocab: int, num_tokens: int) -> Tensor:
    """(C, V^N): the product of the per-position marginals of ``joint`` (what an uncorrelated model would get)."""
    seqs = all_sequences(vocab, num_tokens)  # (S, N)
    out = torch.ones_like(joint, dtype=torch.float64)
    for i in range(num_tokens):
        onehot = torch.nn.functional.one_hot(seqs[:, i], vocab).double()  # (S, V)
        marg = joint.double() @ onehot  # (C, V)
        out = out * marg[:, seqs[:, i]]
    return out


def sample_joint(joint: Tensor, per_class: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Exact samples of the joint: sequence indices (C * per_class,) and labels, ``per_class`` per class."""
    idx = torch.multinomial(joint.double(), per_class, replacement=True, generator=generator)  # (C, per_class)
    labels = torch.arange(joint.shape[0]).repeat_interleave(per_class)
    return idx.reshape(-1), labels


def tv_floor(joint: Tensor, per_class: int, seed: int = 0) -> float:
    """TV of ``per_class`` exact samples per class against the joint: the sampling noise of any TV estimate."""
    g = torch.Generator().manual_seed(seed)
    idx, labels = sample_joint(joint, per_class, g)
    S = joint.shape[1]
    counts = torch.bincount(labels * S + idx, minlength=joint.numel()).reshape(joint.shape).double()
    return tv(counts / per_class, joint)


def tv_per_position(p: Tensor, q: Tensor, vocab: int, num_tokens: int) -> list[float]:
    """TV of the per-position marginals of p and q, mean over classes (where the error sits)."""
    seqs = all_sequences(vocab, num_tokens)
    out = []
    for i in range(num_tokens):
        onehot = torch.nn.functional.one_hot(seqs[:, i], vocab).double()
        out.append(tv(p.double() @ onehot, q.double() @ onehot))
    return out
