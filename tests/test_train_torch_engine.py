"""TorchEngine: modes, AdamW + clipping + LR on its own counter, non-finite gradients, save/load."""

import math

import pytest
import torch
from torch import nn

from dd2dist.engine.factory import EngineFactory, TorchEngineFactory
from dd2dist.engine.optim import OptimSpec
from dd2dist.engine.torch_engine import TorchEngine


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    return net(torch.randn(5, 3, generator=g)).pow(2).sum()


def test_factory_satisfies_protocol_and_teacher_is_frozen_for_good():
    factory = TorchEngineFactory()
    assert isinstance(factory, EngineFactory)
    teacher = factory.teacher(_net())
    teacher.assert_mode(False)
    with pytest.raises(ValueError, match="no optimizer"):
        teacher.set_trainable(True)
    with pytest.raises(RuntimeError, match="frozen"):
        teacher.step()


def test_step_matches_manual_adamw_with_clipping_and_warmup():
    spec = OptimSpec(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=0.5, lr_start=1e-4, warmup_steps=3)
    eng = TorchEngine("student", _net(), spec)
    ref = _net()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1.0, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    eng.set_trainable(True)
    eng.assert_mode(True)
    for n in range(4):
        eng.backward(_loss(eng.module, n))
        stats = eng.step()
        ref_opt.zero_grad()
        _loss(ref, n).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
        for group in ref_opt.param_groups:
            group["lr"] = spec.lr_at(n)
        ref_opt.step()
        assert stats.grad_norm == pytest.approx(float(norm)) and stats.lr == pytest.approx(spec.lr_at(n))
        assert not stats.skipped and eng.optimizer_steps == n + 1
    for a, b in zip(eng.module.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert eng.lr == pytest.approx(1e-2)


def test_grad_accum_averages_micro_batches():
    one = TorchEngine("a", _net(), OptimSpec(lr=1e-2, grad_accum=1, grad_clip=0))
    two = TorchEngine("b", _net(), OptimSpec(lr=1e-2, grad_accum=2, grad_clip=0))
    for e in (one, two):
        e.set_trainable(True)
    one.backward(_loss(one.module, 0))
    two.backward(_loss(two.module, 0))
    two.backward(_loss(two.module, 0))
    g1 = [p.grad.clone() for p in one.module.parameters()]
    g2 = [p.grad.clone() for p in two.module.parameters()]
    assert all(torch.allclose(a, b) for a, b in zip(g1, g2))


def test_non_finite_gradient_skips_without_ticking():
    eng = TorchEngine("g", _net(), OptimSpec(lr=1e-2))
    eng.set_trainable(True)
    before = eng.full_state_dict()
    w = next(eng.module.parameters())
    loss = (w - w.detach()).abs().sqrt().sum()  # value 0, gradient inf
    assert math.isfinite(float(loss.detach()))
    eng.backward(loss)
    stats = eng.step()
    assert stats.skipped and math.isnan(stats.grad_norm) and eng.optimizer_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in eng.full_state_dict().items())
    assert all(p.grad is None for p in eng.module.parameters())


def test_save_load_round_trip(tmp_path):
    spec = OptimSpec(lr=1e-2, warmup_steps=5)
    a = TorchEngine("guidance", _net(), spec)
    a.set_trainable(True)
    for n in range(3):
        a.backward(_loss(a.module, n))
        a.step()
    a.save(tmp_path / "guidance")
    b = TorchEngine("guidance", nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), spec)
    b.load(tmp_path / "guidance")
    assert b.optimizer_steps == 3 and b.lr == a.lr
    assert all(torch.equal(v, a.full_state_dict()[k]) for k, v in b.full_state_dict().items())
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    with pytest.raises(ValueError, match="belongs to"):
        TorchEngine("generator", _net(), spec).load(tmp_path / "guidance")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        b.load(tmp_path / "missing")


def test_reset_optimizer_restarts_counter_and_moments():
    eng = TorchEngine("g", _net(), OptimSpec(lr=1e-2, warmup_steps=4, lr_start=0.0))
    eng.set_trainable(True)
    eng.backward(_loss(eng.module))
    eng.step()
    eng.reset_optimizer()
    assert eng.optimizer_steps == 0 and eng.optimizer.state_dict()["state"] == {}
    assert eng.lr == pytest.approx(1e-2 / 4)


def test_a_parameter_group_steps_at_its_multiple_of_the_lr():
    """``OptimSpec.lr_scales``: the named parameters form their own AdamW group, stepped at the multiple of the
    scheduled LR (Adam's first step moves each weight by about the LR, so the multiple shows directly)."""
    from dd2dist.engine.optim import param_groups

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    spec = OptimSpec(lr=1e-3, lr_scales=(("1.", 10.0),))
    engine = TorchEngine("generator", net, spec)
    engine.set_trainable(True)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(2):  # again after a fresh optimizer: the groups are rebuilt with it
        engine.backward(net(torch.randn(8, 3)).pow(2).mean())
        engine.step()
        moved = [float((p.detach() - b).abs().median()) for p, b in zip(net.parameters(), before)]
        assert moved[0] == pytest.approx(1e-3, rel=0.05) and moved[1] == pytest.approx(1e-3, rel=0.05)
        assert moved[2] == pytest.approx(1e-2, rel=0.05) and moved[3] == pytest.approx(1e-2, rel=0.05)
        assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
        engine.reset_optimizer(spec)
        before = [p.detach().clone() for p in net.parameters()]
    assert len(param_groups(net, OptimSpec(lr=1e-3))) == 1  # no scales: one group, as before
    with pytest.raises(ValueError, match="'2.'"):
        param_groups(net, OptimSpec(lr=1e-3, lr_scales=(("2.", 10.0),)))  # a prefix that names nothing
    with pytest.raises(ValueError, match="lr_scales"):
        OptimSpec(lr=1e-3, lr_scales=(("1.", 0.0),))
