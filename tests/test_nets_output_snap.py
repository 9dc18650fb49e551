"""The generator's soft-snap output layer (student.generator_snap)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config.schema import StudentConfig
from dd2dist.method.ode_init import regression_loss
from dd2dist.nets import StudentNet
from dd2dist.nets.output_snap import code_spacing, soft_snap
from dd2dist.teachers import VARConfig, build_family

SMALL_VAR = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2), num_classes=4)
CFG = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8)


def test_code_spacing_is_the_median_nearest_neighbour_distance_ignoring_duplicates():
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    # nearest others: 1, 1, 1 (the duplicate is ignored), 2, 2 -> median 1
    assert code_spacing(codes) == pytest.approx(1.0)
    assert code_spacing(codes, chunk=2) == pytest.approx(1.0)


def test_soft_snap_returns_codes_near_codes_and_moves_smoothly_across_a_boundary():
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    near = torch.tensor([[0.1, 0.05], [0.9, -0.1]])
    assert torch.allclose(soft_snap(near, codes, 0.1), codes[:2], atol=1e-3)
    # on the boundary between two codes: their mean, and a gradient that can move the output across it
    mid = torch.tensor([[0.5, -0.2]], requires_grad=True)
    out = soft_snap(mid, codes, 0.1)
    assert torch.allclose(out, torch.tensor([[0.5, 0.0]]), atol=1e-3)
    out[0, 0].backward()
    assert mid.grad[0, 0] > 1.0
    # a larger length blurs: the output is a convex combination of the codes
    wide = soft_snap(near, codes, 10.0)
    assert torch.allclose(wide, codes.mean(0).expand_as(wide), atol=0.05)
    with pytest.raises(ValueError, match="length"):
        soft_snap(near, codes, 0.0)


def _nets(snap: float):
    torch.manual_seed(0)
    teacher = build_family("var", var=SMALL_VAR).freeze()
    torch.manual_seed(1)
    net = StudentNet(teacher, replace(CFG, generator_snap=snap))
    with torch.no_grad():  # a head that has moved off zero, so the outputs depend on the noise
        for p in net.head.parameters():
            p.normal_(0, 0.2)
    return teacher, net


def test_generator_outputs_go_through_the_snap_and_the_sampling_form_matches():
    teacher, net = _nets(0.25)
    eps = torch.randn(5, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(2))
    cond = Cond(labels=torch.arange(5) % 4)
    with torch.no_grad():
        raw = net.generate(eps, cond, snap=False)
        snapped = net.generate(eps, cond)
        length = 0.25 * code_spacing(teacher.codebook())
        assert net.snap_length() == pytest.approx(length)
        assert torch.allclose(snapped, soft_snap(raw, teacher.codebook(), length), atol=1e-6)
        assert torch.allclose(net.for_sampling().generate(eps, cond), snapped, atol=1e-5)
        # closer to the codes than the map before the snap
        cb = teacher.codebook()
        dist = lambda q: torch.cdist(q.reshape(-1, q.shape[-1]), cb).min(-1).values.mean()  # noqa: E731
        assert dist(snapped) < 0.5 * dist(raw)
    _, plain = _nets(0.0)
    with torch.no_grad():
        assert torch.equal(plain.generate(eps, cond), plain.generate(eps, cond, snap=False))


def test_the_regression_fits_the_map_before_the_snap():
    teacher, net = _nets(0.25)
    eps = torch.randn(3, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(3))
    cond = Cond(labels=torch.arange(3))
    target = teacher.codebook()[torch.randint(0, teacher.vocab_size, (3, teacher.num_tokens))]
    loss, _ = regression_loss(net, eps, cond, target)
    with torch.no_grad():
        expected = (net.generate(eps, cond, snap=False) - target).pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_snap_length_follows_a_loaded_codebook():
    teacher, net = _nets(0.5)
    before = net.snap_length()
    state = net.state_dict()
    codebook = teacher.codebook()
    key = next(k for k, v in state.items() if v.shape == codebook.shape and torch.equal(v, codebook))
    state[key] = state[key] * 2.0
    net.load_state_dict(state)
    assert net.snap_length() == pytest.approx(2.0 * before, rel=1e-5)


def test_generator_snap_is_refused_below_zero():
    from dd2dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="student.generator_snap"):
        load_config("configs/base.yaml", ["student.generator_snap=-0.1"])
