"""Stage 2 with categorical generator outputs: the outputs are the codes the noise picks, the exact KL trains the
generator alone (no guidance network), the run resumes exactly, and the export samples as it trained."""

import math
from pathlib import Path

import pytest
import torch
from test_train_trainer import _assert_same, _cfg, _snapshot, _teacher, _trainer

from dd2dist.conditions import Cond
from dd2dist.config.schema import CompactHeadConfig, ConfigError, Stage2Config, StudentConfig
from dd2dist.eval.sampling import load_generator
from dd2dist.method.losses import (
    FILTERED_LOG_PROB,
    categorical_divergence,
    categorical_kl_loss,
    reverse_kl,
    target_kl,
)
from dd2dist.method.phases import DD2Phases
from dd2dist.nets.categorical import pick_codes, principal_order
from dd2dist.nets.student import StudentNet
from dd2dist.train import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
CATEGORICAL = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True,
                            generator_output="categorical")
STAGE2 = Stage2Config(generator_steps=6, generator_lr=3e-3, warmup_guidance_steps=2, batch_size=8)


def _categorical_cfg(**kw):
    return _cfg(stages=("stage1", "stage2"), student=CATEGORICAL, stage2=STAGE2, **kw)


@pytest.mark.parametrize("change, field", [
    (dict(student=StudentConfig(generator_output="categorical")), "student.posterior_head"),
    (dict(stage2=Stage2Config(ode_init_steps=5)), "stage2.ode_init_steps"),
    (dict(stage2=Stage2Config(regression_weight=1.0)), "stage2.regression_weight"),
    (dict(stages=("stage1", "stage2", "alignment")), "stages"),
    (dict(compact_head=CompactHeadConfig(enabled=True)), "compact_head.enabled"),
])
def test_settings_a_categorical_generator_cannot_use_are_refused_by_name(change, field):
    kw = dict(stages=("stage1", "stage2"), student=CATEGORICAL, stage2=STAGE2)
    kw.update(change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(**kw)


@pytest.mark.parametrize("change, field", [
    (dict(stage2=Stage2Config(categorical_divergence="symmetric")), "stage2.categorical_divergence"),
    (dict(stages=("stage1", "stage2"), student=CATEGORICAL, stage2=Stage2Config(neighbour_picks_lr_scale=10.0)),
     "stage2.neighbour_picks_lr_scale"),
])
def test_categorical_settings_are_refused_where_nothing_reads_them(change, field):
    """The symmetric divergence on a continuous (CSD) generator, a neighbour-picks LR without neighbour picks."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(**change)


def test_the_symmetric_divergence_is_the_mean_of_both_kl_directions_and_finite_on_filtered_codes():
    target = torch.log_softmax(torch.tensor([[[2.0, 0.0, -float("inf"), 1.0]]]), -1)
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    other = torch.log_softmax(logits, -1)
    assert float(reverse_kl(target, target.clamp_min(-1e4)).abs()) < 1e-6  # zero at the target
    q = other.detach()
    expected = float((q.exp() * (q - target.clamp_min(FILTERED_LOG_PROB))).sum())
    assert float(reverse_kl(target, q)) == pytest.approx(expected, rel=1e-6)
    assert 20 < expected < 25  # the quarter on the filtered code costs a quarter of -log(fp32 tiny), not inf
    symmetric = categorical_divergence(target, other, "symmetric")
    torch.testing.assert_close(symmetric, 0.5 * (target_kl(target, other) + reverse_kl(target, other)))
    torch.testing.assert_close(categorical_divergence(target, other, "forward"), target_kl(target, other))
    symmetric.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 2] > 0  # pushes mass off the filtered code
    with pytest.raises(ValueError, match="backward"):
        categorical_divergence(target, other, "backward")


def test_the_reverse_term_drains_mass_from_codes_the_teacher_almost_never_draws_faster():
    """From a uniform start, the same gradient steps towards a teacher conditional with two likely codes and a tail
    of fourteen at 1e-4: the forward KL's gradient on a tail code is only the generator's mass there, the reverse
    term's that mass times the log-ratio, so under the symmetric divergence far less mass is left on the tail."""
    V = 16
    p = torch.full((V,), 1e-4)
    p[0], p[1] = 0.7, 0.3 - 1e-4 * (V - 2)
    tail = {}
    for kind in ("forward", "symmetric"):
        logits = torch.zeros(V, requires_grad=True)
        opt = torch.optim.SGD([logits], lr=0.5)
        for _ in range(30):
            loss = categorical_divergence(p.log().view(1, 1, V), torch.log_softmax(logits, -1).view(1, 1, V), kind)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
        tail[kind] = float(torch.softmax(logits.detach(), -1)[2:].sum())
    assert tail["symmetric"] < 0.5 * tail["forward"], tail


def test_categorical_stage2_is_generator_steps_alone_without_a_guidance_network():
    method = DD2Phases(_categorical_cfg())
    stage2 = method.schedule.phases[-1]
    assert (stage2.name, stage2.kind, stage2.iterations, stage2.roles) == ("stage2", "categorical", 6, ("generator",))
    assert [spec.role for spec in method.group("stage2", stage2).nets] == ["generator"]
    assert method.entry_actions(len(method.schedule.phases) - 1) == ()


def test_generate_returns_the_codes_its_log_probs_pick_and_the_sampler_agrees():
    teacher = _teacher().freeze()
    net = StudentNet(teacher, CATEGORICAL).eval()
    eps = torch.randn(64, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(0))
    cond = Cond(labels=torch.arange(64) % teacher.num_classes)
    with torch.no_grad():
        ids = pick_codes(net.generator_log_probs(eps, cond), eps)
    codebook = net.backbone.codebook()
    out = net.generate(eps, cond)
    assert torch.equal(out, codebook[ids])
    assert torch.equal(net.for_sampling().generate(eps, cond), out)
    # causal: the last position's noise moves no other token (and its own, somewhere)
    later = eps.clone()
    later[:, -1] = -later[:, -1]
    moved = net.generate(later, cond)
    assert torch.equal(moved[:, :-1], out[:, :-1]) and not torch.equal(moved[:, -1], out[:, -1])


def test_the_loss_is_the_exact_kl_of_the_picked_prefix_and_trains_only_the_generator():
    teacher = _teacher().freeze()
    sampling = _cfg().teacher.sampling
    net = StudentNet(teacher, CATEGORICAL)
    eps = torch.randn(16, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(1))
    cond = Cond(labels=torch.arange(16) % teacher.num_classes)
    loss, metrics = categorical_kl_loss(net, teacher, eps, cond, sampling)
    with torch.no_grad():
        lp = net.generator_log_probs(eps, cond)
        expect = target_kl(teacher.log_probs(pick_codes(lp, eps), cond, sampling), lp).sum(-1).mean()
    assert torch.allclose(loss, expect) and float(loss.detach()) > 0 and float(metrics["loss"]) == float(loss.detach())
    loss.backward()
    assert net.code_logits.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in net.head.parameters())  # the MLP head is not part of this generator


def test_the_principal_order_keeps_each_codes_probability_and_makes_the_pick_monotone_along_the_axis():
    codebook = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    order = principal_order(codebook)
    assert sorted(order.tolist()) == list(range(16))
    assert torch.equal(principal_order(codebook.clone()), order)  # deterministic
    probs = torch.softmax(torch.randn(16, generator=torch.Generator().manual_seed(1)), -1)
    eps = torch.randn(100_000, 1, 4, generator=torch.Generator().manual_seed(2))
    ids = pick_codes(probs.log().expand(100_000, 1, 16), eps, order)[:, 0]
    freq = torch.bincount(ids, minlength=16).double() / ids.numel()
    assert torch.allclose(freq, probs.double(), atol=0.006)
    # increasing noise picks codes in increasing place along the axis
    ramp = torch.zeros(200, 1, 4)
    ramp[:, 0, 0] = torch.linspace(-3, 3, 200)
    place = torch.empty(16, dtype=torch.long)
    place[order] = torch.arange(16)
    picked = place[pick_codes(probs.log().expand(200, 1, 16), ramp, order)[:, 0]]
    assert bool((picked.diff() >= 0).all())


def test_a_principal_order_generator_samples_as_it_trains():
    teacher = _teacher().freeze()
    cfg = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True,
                        generator_output="categorical", categorical_order="principal")
    net = StudentNet(teacher, cfg).eval()
    eps = torch.randn(32, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(3))
    cond = Cond(labels=torch.arange(32) % teacher.num_classes)
    with torch.no_grad():
        ids = pick_codes(net.generator_log_probs(eps, cond), eps, principal_order(net.backbone.codebook()))
    assert torch.equal(net.generate(eps, cond), net.backbone.codebook()[ids])
    assert torch.equal(net.for_sampling().generate(eps, cond), net.generate(eps, cond))
    assert not torch.equal(ids, pick_codes(net.generator_log_probs(eps, cond), eps))  # the order matters
    # the order is kept, not recomputed per call, and follows a loaded codebook
    codebook = net.backbone.codebook()
    assert torch.equal(net.code_order(), principal_order(codebook))
    state = net.state_dict()
    (key,) = [k for k, v in state.items() if v.shape == codebook.shape and torch.equal(v, codebook)]
    state[key] = torch.randn(codebook.shape, generator=torch.Generator().manual_seed(4))
    net.load_state_dict(state)
    assert torch.equal(net.code_order(), principal_order(state[key]))
    assert not torch.equal(net.code_order(), principal_order(codebook))


@pytest.fixture(scope="module")
def categorical_run():
    tr = _trainer(_categorical_cfg())
    tr.fit()
    assert tr.done and "guidance" not in tr.engines
    return tr, _snapshot(tr)


def test_a_categorical_run_trains_resumes_exactly_and_exports_a_code_sampler(tmp_path, categorical_run):
    tr, end = categorical_run
    assert math.isfinite(tr.last_metrics["generator/loss"])
    first = _trainer(_categorical_cfg())
    first.fit(checkpoint_dir=tmp_path / "ck", checkpoint_every=1000, max_iterations=6 + 3)  # inside stage 2
    second = _trainer(_categorical_cfg())
    assert second.resume_latest(tmp_path / "ck").name == "step_00000009"
    second.fit()
    _assert_same(_snapshot(second), end)
    tr.export_generator(tmp_path / "export")
    net, cfg = load_generator(tmp_path / "export")
    assert cfg.student.generator_output == "categorical"
    eps = torch.randn(32, net.num_tokens, net.embed_dim, generator=torch.Generator().manual_seed(2))
    out = net.for_sampling().generate(eps, Cond(labels=torch.arange(32) % 4))
    codebook = net.backbone.codebook()
    assert torch.equal(torch.cdist(out.reshape(-1, out.shape[-1]), codebook).min(-1).values,
                       torch.zeros(out.shape[0] * out.shape[1]))


def test_categorical_stage2_lowers_the_kl_to_the_teacher():
    stage2 = Stage2Config(generator_steps=60, generator_lr=3e-3, warmup_guidance_steps=2, batch_size=16)
    cfg = _cfg(stages=("stage2",), student=CATEGORICAL, stage2=stage2)
    kl = []

    class Record(TrainerCallback):
        def on_log(self, trainer, metrics, step):
            if "generator/loss" in metrics:
                kl.append(metrics["generator/loss"])

    _trainer(cfg, callbacks=[Record()]).fit()
    first, last = sum(kl[:10]) / 10, sum(kl[-10:]) / 10
    assert last < 0.8 * first, (first, last)


CATEGORICAL_OVERRIDES = ["stages=[stage2]", "student.posterior_head=true", "student.generator_output=categorical",
                         "student.noise_input=mlp"]


def _zero_worker(rank: int, world: int, tmp: str) -> dict:
    """The smoke_var_deepspeed recipe's stage 2 with a categorical generator, on DeepSpeed engines with the teacher
    under ZeRO-3: the generator under ZeRO-0 and under ZeRO-3 (its code logits and input path read through the routed
    ``generator_log_probs``)."""
    from dd2dist.config import load_config
    from dd2dist.engine.deepspeed_factory import DeepSpeedEngineFactory
    from dd2dist.teachers import build_teacher
    from dd2dist.train import Trainer

    out = {}
    for zero in (0, 3):
        cfg = load_config(str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml"),
                          [*CATEGORICAL_OVERRIDES, f"engine.zero_stage_generator={zero}", f"output_dir={tmp}/{zero}"])
        torch.manual_seed(cfg.seed)
        tr = Trainer(cfg, build_teacher(cfg.teacher), DeepSpeedEngineFactory(cfg.engine), rank=rank, world_size=world)
        tr.fit()
        out[zero] = {"generator": tr.generator_state_dict(use_ema=False), "kl": tr.last_metrics["generator/loss"],
                     "engines": sorted(tr.engines), "iteration": tr.state.iteration}
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_categorical_stage2_on_two_deepspeed_ranks_is_the_same_under_zero3(tmp_path):
    from dd2dist.launch.local_ranks import run_ranks

    for out in run_ranks(_zero_worker, 2, str(tmp_path), timeout=240):
        z0, z3 = out[0], out[3]
        assert z0["engines"] == z3["engines"] == ["generator"] and z0["iteration"] == z3["iteration"] == 6
        assert math.isfinite(z0["kl"]) and abs(z0["kl"] - z3["kl"]) < 1e-5
        for key, value in z0["generator"].items():
            torch.testing.assert_close(z3["generator"][key].float(), value.float(), rtol=1e-5, atol=1e-6)
