"""Fast checks of the exact check's own machinery: enumeration, TV, marginal products, the toy teacher and its fit."""

from __future__ import annotations

import math

import pytest
import torch

from dd2dist.bench.toy_teacher import (
    ToyTeacherSpec,
    _fit_rows,
    all_sequences,
    build_toy_teacher,
    sequence_index,
    table_joint,
    table_log_probs,
    toy_codebook,
)
from dd2dist.bench.toy_tv import empirical, exact_joint, marginal_product, tv, tv_floor, tv_per_position
from dd2dist.conditions import Cond, Sampling


def test_tv_of_a_distribution_with_itself_is_zero():
    p = torch.softmax(torch.randn(3, 16), -1)
    assert tv(p, p) == 0.0


def test_tv_hand_computed():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]])
    # class 0: 0.5 * (0.25 + 0.25 + 0.25 + 0.25) = 0.5; class 1: disjoint supports = 1; mean 0.75
    assert tv(p, q) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shapes"):
        tv(p, q[:1])


def test_enumeration_order_and_index_round_trip():
    seqs = all_sequences(3, 4)
    assert seqs.shape == (81, 4)
    assert seqs[0].tolist() == [0, 0, 0, 0] and seqs[1].tolist() == [0, 0, 0, 1] and seqs[3].tolist() == [0, 0, 1, 0]
    assert torch.equal(sequence_index(seqs, 3), torch.arange(81))


def test_empirical_counts_per_class():
    ids = torch.tensor([[0, 1], [0, 1], [1, 1], [0, 0]])
    labels = torch.tensor([0, 0, 0, 1])
    emp = empirical(ids, labels, vocab=2, num_classes=2)
    assert emp[0].tolist() == pytest.approx([0.0, 2 / 3, 0.0, 1 / 3])
    assert emp[1].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="no samples"):
        empirical(ids, torch.zeros(4, dtype=torch.long), vocab=2, num_classes=2)


def test_marginal_product_hand_computed():
    # two perfectly correlated binary tokens: 00 or 11 with 1/2 each; marginals are fair coins, the product is
    # uniform over 4 sequences and TV = 0.5 * (0.25 + 0.25 + 0.25 + 0.25) = 0.5
    joint = torch.tensor([[0.5, 0.0, 0.0, 0.5]])
    prod = marginal_product(joint, vocab=2, num_tokens=2)
    assert prod[0].tolist() == pytest.approx([0.25] * 4)
    assert tv(prod, joint) == pytest.approx(0.5)
    assert tv_per_position(prod, joint, 2, 2) == pytest.approx([0.0, 0.0])
    independent = torch.tensor([[0.12, 0.28, 0.18, 0.42]], dtype=torch.float64)  # (0.4, 0.6) x (0.3, 0.7)
    assert tv(marginal_product(independent, 2, 2), independent) == pytest.approx(0.0, abs=1e-12)


def test_tv_floor_shrinks_like_one_over_sqrt_n():
    joint = torch.softmax(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), -1)
    small, large = tv_floor(joint, 1_000), tv_floor(joint, 100_000)
    assert 0 < large < small
    assert large < 0.03 and small / large == pytest.approx(10, rel=0.5)


def test_toy_codebook_spacing():
    tetra = toy_codebook(4, 3, 1.15)
    d = torch.cdist(tetra, tetra)[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(d, torch.full_like(d, 1.15), atol=1e-5)  # a regular tetrahedron
    many = toy_codebook(12, 3, 1.0)
    d = torch.cdist(many, many)[~torch.eye(12, dtype=torch.bool)]
    assert float(d.min()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dependence", ["prefix", "markov"])
def test_table_is_a_distribution_and_markov_ignores_older_tokens(dependence):
    spec = ToyTeacherSpec(family="llamagen", vocab=3, grid=2, num_classes=2, dependence=dependence)
    seqs = all_sequences(3, 4)
    joint = table_joint(spec, seqs)
    assert torch.allclose(joint.sum(-1), torch.ones(2), atol=1e-6)
    lp = table_log_probs(spec, seqs)
    # the last token's conditional: same token 2, different token 0
    a, b = sequence_index(torch.tensor([0, 1, 2, 0]), 3), sequence_index(torch.tensor([1, 1, 2, 0]), 3)
    same = torch.allclose(lp[:, a, 3], lp[:, b, 3])
    assert same == (dependence == "markov")


def test_fit_rows_marginalisation_equals_full_enumeration():
    """The fit's cheap loss (one row per input assignment) equals the expected NLL over all V^N sequences."""
    spec = ToyTeacherSpec(family="llamagen", vocab=3, grid=2, num_classes=2, fit_steps=0)
    teacher, _ = build_toy_teacher(spec)  # untrained: any model works for the identity
    rows, marg, target = _fit_rows(spec)
    seqs = all_sequences(3, spec.num_tokens)
    joint = table_joint(spec, seqs)
    with torch.no_grad():
        cheap, full = 0.0, 0.0
        for y in range(2):
            lp_rows = teacher.log_probs(rows, Cond(labels=torch.full((rows.shape[0],), y)))
            cheap += float(-(marg[y, :, None, None] * target[y] * lp_rows).sum())
            lp_all = teacher.log_probs(seqs, Cond(labels=torch.full((seqs.shape[0],), y)))
            seq_lp = lp_all.gather(-1, seqs[..., None])[..., 0].sum(-1)
            full += float(-(joint[y] * seq_lp).sum())
    assert cheap == pytest.approx(full, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family,vocab,sampling", [
    ("var", 4, Sampling(guidance_scale=2.0, guidance_schedule="var_linear")),
    ("llamagen", 3, Sampling(guidance_scale=2.0, guidance_schedule="constant")),
])
def test_toy_teacher_fits_and_its_exact_joint_matches_its_sampler(family, vocab, sampling):
    torch.manual_seed(0)
    spec = ToyTeacherSpec(family=family, vocab=vocab, num_classes=2, fit_steps=150)
    teacher, fit = build_toy_teacher(spec)
    # the transformer reproduces the table (an untrained one is ~1 nat per sequence off)
    assert fit.cross_entropy - fit.table_entropy < 0.25
    assert teacher.codebook().shape == (vocab, 3)
    joint = exact_joint(teacher, sampling, 2)
    assert joint.shape == (2, vocab**spec.num_tokens)
    assert torch.allclose(joint.sum(-1), torch.ones(2), atol=1e-5)
    # an independent computation of the same distribution: the teacher's KV-cached AR sampler
    n = 20_000
    labels = torch.arange(2).repeat_interleave(n)
    ids = teacher.sample(Cond(labels=labels), sampling, generator=torch.Generator().manual_seed(1))
    sampled = tv(empirical(ids, labels, vocab, 2), joint)
    assert sampled < 2.5 * tv_floor(joint, n) + 0.005
    # and it is strongly correlated: an uncorrelated model is far from it
    assert tv(marginal_product(joint, vocab, spec.num_tokens), joint) >= 0.30
    assert not math.isnan(fit.seconds)
