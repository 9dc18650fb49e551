"""Schedule (phases, alternation), LR warm-up per optimizer, EMA maths, seeding."""

import pytest
import torch

from dd2dist.config.schema import AlignmentConfig, ExperimentConfig, Stage1Config, Stage2Config
from dd2dist.engine.optim import OptimSpec
from dd2dist.method import EMA, build_schedule, derive_seed, ema_decay, generator_warmup_steps, make_generator


def test_ema_progressive_decay_exact_over_steps():
    p = torch.tensor([0.0, 10.0])
    ema = EMA([p], ema_max=0.5)
    values = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0])]
    ref = p.clone()
    decays = []
    for n, v in enumerate(values):
        d = min(0.5, (n + 1) / (n + 10))  # 0.1, 2/11, 0.25, 4/13 ... capped at 0.5
        ref = d * ref + (1 - d) * v
        decays.append(ema.update([v]))
        assert torch.allclose(ema.shadow[0], ref, atol=1e-7)
    assert decays == pytest.approx([0.1, 2 / 11, 0.25, 4 / 13])
    assert ema.updates == 4
    assert ema_decay(10_000_000, 0.9999) == 0.9999
    assert ema_decay(0, 0.9999, "none") == 0.9999


def test_ema_swapped_into_restores_the_raw_values():
    raw = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    ema = EMA([t.clone() for t in raw], ema_max=0.5)
    ema.update([torch.tensor([5.0, 6.0]), torch.tensor([[7.0]])])  # decay 0.1 at the first update
    live = [t.clone() for t in raw]
    with ema.swapped_into(live):
        assert torch.allclose(live[0], torch.tensor([4.6, 5.6])) and torch.allclose(live[1], torch.tensor([[6.6]]))
    assert all(torch.equal(a, b) for a, b in zip(live, raw))
    with pytest.raises(RuntimeError), ema.swapped_into(live):  # restored even when the body raises
        raise RuntimeError
    assert all(torch.equal(a, b) for a, b in zip(live, raw))


def test_ema_rampup_sets_the_progressive_horizon():
    assert ema_decay(0, 1.0, rampup=2.0) == pytest.approx(0.5)
    assert ema_decay(98, 1.0, rampup=2.0) == pytest.approx(0.99)  # (n+1)/(n+2): averages about the last half
    assert ema_decay(98, 1.0) == pytest.approx(99 / 108)  # the paper's (n+1)/(n+10)
    ema = EMA([torch.zeros(1)], ema_max=1.0, rampup=3.0)
    assert [ema.update([torch.ones(1)]) for _ in range(3)] == pytest.approx([1 / 3, 2 / 4, 3 / 5])
    with pytest.raises(ValueError, match="ema_rampup"):
        EMA([torch.zeros(1)], ema_max=0.9, rampup=1.0)


def test_ema_copy_to_and_state_round_trip():
    a, b = torch.randn(3), torch.randn(2, 2)
    ema = EMA([a, b], 0.9999)
    ema.update([torch.ones(3), torch.ones(2, 2)])
    fresh = EMA([torch.zeros(3), torch.zeros(2, 2)], 0.9999)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.updates == 1 and all(torch.equal(x, y) for x, y in zip(fresh.shadow, ema.shadow))
    targets = [torch.zeros(3), torch.zeros(2, 2)]
    fresh.copy_to(targets)
    assert torch.equal(targets[0], ema.shadow[0])
    with pytest.raises(ValueError, match="count or shape"):
        ema.update([torch.ones(3)])


def test_linear_warmup_on_own_steps():
    spec = OptimSpec(lr=1e-3, lr_start=1e-6, warmup_steps=4)
    lrs = [spec.lr_at(n) for n in range(6)]
    expected = [1e-6 + (1e-3 - 1e-6) * min(1, (n + 1) / 4) for n in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[3] == pytest.approx(1e-3) and lrs[5] == pytest.approx(1e-3)
    assert OptimSpec(lr=2e-4).lr_at(0) == 2e-4
    # Tab.11: generator warm-up over 40k guidance iterations with K=5 is 8k generator steps
    assert generator_warmup_steps(40_000, 5) == 8_000
    assert generator_warmup_steps(10, 3) == 4


def test_schedule_phases_and_alternation():
    cfg = ExperimentConfig(
        stages=("stage1", "stage2", "alignment"),
        stage1=Stage1Config(head_only_steps=3, steps=5),
        stage2=Stage2Config(generator_steps=4, guidance_per_generator=3),
        alignment=AlignmentConfig(enabled=True, after_generator_steps=4, guidance_only_steps=2,
                                  guidance_per_generator_after=1, generator_steps_after=2),
    )
    s = build_schedule(cfg)
    assert [(p.name, p.iterations) for p in s.phases] == [
        ("stage1_head", 3), ("stage1", 5), ("stage2", 16), ("align", 2), ("stage2_after", 4)]
    stage2 = s.phases[2]
    roles = [stage2.role_at(i) for i in range(stage2.iterations)]
    assert roles == (["guidance"] * 3 + ["generator"]) * 4
    assert [s.phases[4].role_at(i) for i in range(4)] == ["guidance", "generator"] * 2
    assert s.phases[3].ema_to_generator_on_entry and s.phases[3].roles == ("guidance",)
    assert s.total_iterations == 30


def test_schedule_refuses_inconsistent_alignment_start():
    cfg = ExperimentConfig(stages=("stage2", "alignment"), stage2=Stage2Config(generator_steps=5),
                           alignment=AlignmentConfig(enabled=True, after_generator_steps=4))
    with pytest.raises(ValueError, match="alignment.after_generator_steps"):
        build_schedule(cfg)


def test_llamagen_style_no_head_only_phase():
    cfg = ExperimentConfig(stage1=Stage1Config(head_only_steps=0, steps=7))
    assert [p.name for p in build_schedule(cfg).phases] == ["stage1", "stage2"]


def test_seeds_are_pure_functions_of_their_key():
    assert derive_seed(0, 1, 2, "csd") == derive_seed(0, 1, 2, "csd")
    keys = [(0, 0, 0, "a"), (1, 0, 0, "a"), (0, 1, 0, "a"), (0, 0, 1, "a"), (0, 0, 0, "b")]
    assert len({derive_seed(*k) for k in keys}) == len(keys)
    a = torch.randn(4, generator=make_generator(3, 0, 7, "eps"))
    torch.randn(100)  # the global RNG does not matter
    b = torch.randn(4, generator=make_generator(3, 0, 7, "eps"))
    assert torch.equal(a, b)
