"""The PF-ODE generator start (dd2dist.method.ode_init): the map carries noise to codes with the teacher's
probabilities, the samplers' pick hook, the regression loss, and its phase in the schedule and the trainer."""

import math
from dataclasses import replace

import pytest
import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.config.schema import (
    AlignmentConfig,
    ExperimentConfig,
    Stage1Config,
    Stage2Config,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.method import build_schedule
from dd2dist.method.ode_init import ode_times, pf_ode_codes, regression_loss, teacher_ode_tokens
from dd2dist.nets.student import StudentNet
from dd2dist.teachers import LlamaGenConfig, VARConfig, VARVQConfig, build_family
from dd2dist.train import OnStep, Trainer

VAR_ARCH = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4,
                     tokenizer=VARVQConfig(vocab_size=16, embed_dim=4))
LG_ARCH = LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=2, num_classes=3)


def _teacher(family: str):
    torch.manual_seed(0)
    teacher = build_family("var", var=VAR_ARCH) if family == "var" else build_family("llamagen", llamagen=LG_ARCH)
    return teacher.freeze()


def _sampling(family: str) -> Sampling:
    if family == "var":
        return Sampling(guidance_scale=1.5, guidance_schedule="var_linear")
    return Sampling(guidance_scale=2.0, top_k=8)


# ---- the map ---------------------------------------------------------------------------------------------------


def test_ode_times_run_from_one_to_t_min_and_reject_zero_steps():
    times = ode_times(8, 0.02)
    assert len(times) == 9 and times[0] == 1.0 and math.isclose(times[-1], 0.02)
    assert all(a > b for a, b in zip(times[:-1], times[1:]))
    with pytest.raises(ValueError, match="ode_steps"):
        ode_times(0)


def test_pf_ode_codes_hit_each_code_with_its_probability():
    gen = torch.Generator().manual_seed(0)
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.7, 0.7]])
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])  # the last code is filtered out (-inf)
    n = 20000
    lp = probs.log().expand(n, 1, 5)
    eps = torch.randn(n, 1, 2, generator=gen)
    ids = pf_ode_codes(lp, codebook, eps, num_steps=8)
    freq = torch.bincount(ids.flatten(), minlength=5).float() / n
    assert freq[4] == 0
    assert (freq - probs).abs().max() < 0.01, freq  # 20k draws: binomial sd <= 0.0035
    assert torch.equal(pf_ode_codes(lp, codebook, eps, num_steps=8), ids)  # a deterministic map of eps
    with pytest.raises(ValueError, match="do not match"):
        pf_ode_codes(lp[:, :, :4], codebook, eps, num_steps=4)


def test_pf_ode_map_sends_nearby_noise_to_the_same_code():
    """The map is piecewise constant: most small perturbations of eps keep the code (a random map would not)."""
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(8, 3, generator=gen)
    lp = torch.log_softmax(torch.randn(8, generator=gen), -1).expand(4000, 1, 8)
    eps = torch.randn(4000, 1, 3, generator=gen)
    a = pf_ode_codes(lp, codebook, eps, 8)
    b = pf_ode_codes(lp, codebook, eps + 0.01 * torch.randn(eps.shape, generator=gen), 8)
    assert (a == b).float().mean() > 0.97


# ---- the samplers' pick hook ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_sampler_pick_hook_sees_each_step_and_its_choices_become_the_prefix(family):
    teacher = _teacher(family)
    sampling = _sampling(family)
    cond = Cond(labels=torch.tensor([0, 1, 2]))
    seen = []

    def pick(lp, step):
        seen.append((step, lp.clone()))
        assert lp.shape == (3, step.stop - step.start, teacher.vocab_size)
        return lp.argmax(-1)  # greedy

    ids = teacher.sample(cond, sampling, pick=pick)
    assert [s for s, _ in seen] == list(teacher.steps)
    # the ids fed back are the picked ones: a teacher-forced pass on them reproduces every step's log-probs
    forced = teacher.log_probs(teacher.embed(ids), cond, sampling)
    for step, lp in seen:
        assert torch.equal(ids[:, step], lp.argmax(-1))
        finite = torch.isfinite(lp)
        assert torch.equal(finite, torch.isfinite(forced[:, step]))
        assert torch.allclose(lp[finite], forced[:, step][finite], atol=1e-4)


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_teacher_ode_tokens_are_distributed_as_the_teacher(family):
    """First AR step (conditioned on the class only): the ODE tokens' frequencies match the teacher's
    probabilities; later tokens are the same rule given the prefix (the hook test above)."""
    teacher = _teacher(family)
    sampling = _sampling(family)
    n = 6000
    cond = Cond(labels=torch.zeros(n, dtype=torch.long))
    eps = torch.randn(n, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(2))
    ids = teacher_ode_tokens(teacher, eps, cond, sampling, teacher.codebook(), num_steps=8)
    assert ids.shape == (n, teacher.num_tokens) and not ids.is_inference()
    probs = teacher.log_probs(teacher.embed(ids[:1]), Cond(labels=torch.zeros(1, dtype=torch.long)),
                              sampling)[0, 0].exp()
    freq = torch.bincount(ids[:, 0], minlength=teacher.vocab_size).float() / n
    assert 0.5 * (freq - probs).abs().sum() < 0.03  # sampling noise alone: ~0.02 at 6k draws of 16 codes
    with pytest.raises(ValueError, match="eps must be"):
        teacher_ode_tokens(teacher, eps[:, :1], cond, sampling, teacher.codebook(), 4)


def test_regression_loss_is_the_token_mean_of_squared_errors_and_trains_the_generator():
    teacher = _teacher("var")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(8, teacher.num_tokens, teacher.embed_dim, generator=gen)
    cond = Cond(labels=torch.arange(8) % 4)
    target = teacher.codebook()[torch.randint(teacher.vocab_size, (8, teacher.num_tokens), generator=gen)]
    loss, m = regression_loss(net, eps, cond, target)
    with torch.no_grad():
        manual = (net.generate(eps, cond) - target).pow(2).sum(-1).mean()
    assert torch.allclose(loss, manual) and torch.equal(m["regression_loss"], loss.detach())
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(30):
        loss, _ = regression_loss(net, eps, cond, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


# ---- schedule and trainer --------------------------------------------------------------------------------------


def _cfg(ode_init_steps: int, family: str = "var") -> ExperimentConfig:
    teacher = (TeacherConfig(family="var", var=VAR_ARCH, sampling=_sampling("var")) if family == "var"
               else TeacherConfig(family="llamagen", llamagen=LG_ARCH, sampling=_sampling("llamagen")))
    return ExperimentConfig(
        stages=("stage1", "stage2"),
        teacher=teacher,
        student=StudentConfig(head_width=16, head_depth=1, time_embed_dim=8),
        stage1=Stage1Config(head_only_steps=0, steps=2, lr=1e-3, warmup_steps=1, batch_size=4),
        stage2=Stage2Config(ode_init_steps=ode_init_steps, ode_steps=4, ode_pairs_per_call=3, generator_steps=2,
                            guidance_per_generator=2,
                            generator_lr=1e-3, guidance_lr=1e-3, warmup_guidance_steps=2, fcs_samples=2,
                            batch_size=4),
        alignment=AlignmentConfig(),
        tracking=TrackingConfig(log_every=1),
    )


def test_schedule_puts_the_regression_phase_before_the_alternation():
    names = [(p.name, p.kind, p.iterations) for p in build_schedule(_cfg(5)).phases]
    assert names == [("stage1", "gts", 2), ("stage2_ode_init", "regress", 5), ("stage2", "alternate", 6)]
    phase = build_schedule(_cfg(5)).phases[1]
    assert phase.roles == ("generator",) and {phase.role_at(i) for i in range(5)} == {"generator"}
    assert [p.name for p in build_schedule(_cfg(0)).phases] == ["stage1", "stage2"]  # off by default


def test_negative_ode_init_steps_are_refused_naming_the_field():
    from dd2dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="stage2.ode_init_steps"):
        load_config("configs/base.yaml", ["stage2.ode_init_steps=-1"])
    with pytest.raises(ConfigError, match="stage2.ode_steps"):
        load_config("configs/base.yaml", ["stage2.ode_steps=0"])


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_trainer_regresses_the_generator_only_and_resumes_exactly_inside_the_phase(tmp_path, family):
    from test_train_trainer import _assert_same, _snapshot

    def make():
        torch.manual_seed(0)
        return Trainer(_cfg(4, family), _teacher(family), TorchEngineFactory())

    seen = []

    def watch(tr, metrics):
        if tr.phase is not None and tr.phase.name == "stage2_ode_init":
            seen.append((metrics, {k: v.clone() for k, v in tr.engines["guidance"].full_state_dict().items()}))

    ref = make()
    ref.callbacks.append(OnStep(watch))
    ref.fit()
    assert ref.state.iteration == 2 + 4 + 6
    assert len(seen) == 4 and all("generator/regression_loss" in m for m, _ in seen)
    _assert_same(seen[0][1], seen[-1][1])  # the guidance net does not move while the generator regresses
    # pairs come in blocks of 3 steps: stop after 2 regression steps, inside the first block; then at the last
    # regression step, where the next iteration restarts the generator's optimizer for CSD
    for stop in (4, 6):
        a = make()
        a.fit(checkpoint_dir=tmp_path / str(stop), max_iterations=stop)
        b = make()
        b.resume_latest(tmp_path / str(stop))
        b.fit()
        _assert_same(_snapshot(b), _snapshot(ref))


def test_regression_has_its_own_lr_and_csd_restarts_the_generator_optimizer():
    cfg = _cfg(4)
    cfg = replace(cfg, stage2=replace(cfg.stage2, ode_init_lr=5e-3, ode_init_warmup_steps=2, lr_start=1e-6,
                                      warmup_guidance_steps=4))  # CSD warm-up: 2 generator steps
    torch.manual_seed(0)
    tr = Trainer(cfg, _teacher("var"), TorchEngineFactory())
    gen_steps = []  # (phase, LR of the step, optimizer steps after it)

    def watch(tr, metrics):
        if "generator/lr" in metrics:
            gen_steps.append((tr.phase.name, metrics["generator/lr"], metrics["generator/optimizer_steps"]))

    tr.callbacks.append(OnStep(watch))
    tr.fit()
    regress = [(lr, n) for name, lr, n in gen_steps if name == "stage2_ode_init"]
    csd = [(lr, n) for name, lr, n in gen_steps if name == "stage2"]
    assert [n for _, n in regress] == [1, 2, 3, 4] and [n for _, n in csd] == [1, 2]
    assert regress[0][0] == pytest.approx(1e-6 + (5e-3 - 1e-6) / 2) and regress[-1][0] == pytest.approx(5e-3)
    # the CSD warm-up starts again from lr_start toward generator_lr
    assert csd[0][0] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2) and csd[1][0] == pytest.approx(1e-3)


def test_pairs_come_in_blocks_of_one_sampler_call_and_resume_inside_a_block():
    from dd2dist.train.batches import BatchSource

    teacher = _teacher("llamagen")
    cfg = _cfg(6, "llamagen")  # batch 4, 3 steps per sampler call
    calls = []
    real_sample = teacher.sample

    def counting_sample(*args, **kwargs):
        calls.append(1)
        return real_sample(*args, **kwargs)

    teacher.sample = counting_sample

    def source():
        return BatchSource(cfg, 0, 1, torch.device("cpu"), teacher, None, teacher.codebook())

    src = source()
    # phase iterations 0..5 at global iterations 10..15
    steps = [src.ode_pairs(10 + k, k, 0, teacher) for k in range(6)]
    assert len(calls) == 3  # two blocks, plus the first block's convergence check (_check_ode_map)
    eps = torch.stack([e for e, _, _ in steps])
    assert all(not torch.equal(eps[i], eps[j]) for i in range(6) for j in range(i))
    assert all(e.shape == (4, teacher.num_tokens, teacher.embed_dim) and ids.shape == (4, teacher.num_tokens)
               for e, _, ids in steps)
    fresh = source().ode_pairs(14, 4, 0, teacher)  # a run resumed at the middle of the second block
    for a, b in zip(fresh[::2], steps[4][::2]):
        assert torch.equal(a, b)
    assert torch.equal(fresh[1].labels, steps[4][1].labels)


def test_export_callback_gets_the_regression_generator_once_before_csd(tmp_path):
    """The DD1-style baseline of the fidelity benchmark: the generator exactly as the regression left it."""
    from test_train_trainer import Exports

    def make(*callbacks):
        torch.manual_seed(0)
        return Trainer(_cfg(4), _teacher("var"), TorchEngineFactory(), callbacks=callbacks)

    exports = Exports()
    got = exports.got
    tr = make(exports)
    tr.fit(max_iterations=2 + 4)  # stage 1 and the whole regression: CSD has not been entered yet
    regressed = {k: v.clone() for k, v in tr.engines["generator"].full_state_dict().items()}
    assert [name for name, *_ in got] == ["stage1_student"]
    tr.fit()
    assert [name for name, *_ in got] == ["stage1_student", "generator_regression"]
    _, state, iteration, _ = got[1]
    assert iteration == 6
    assert state.keys() == regressed.keys() and all(torch.equal(state[k], regressed[k]) for k in state)
    # a run resumed inside CSD exported it already: no second call
    a = make()
    a.fit(checkpoint_dir=tmp_path, max_iterations=8)
    later = Exports()
    b = make(later)
    b.resume_latest(tmp_path)
    b.fit()
    assert later.got == []


def test_regression_anchor_adds_the_pair_loss_to_csd_and_resumes_exactly(tmp_path):
    from test_train_trainer import _assert_same, _snapshot

    cfg = _cfg(0)
    cfg = replace(cfg, stage2=replace(cfg.stage2, regression_weight=0.5, generator_steps=4))

    def make():
        torch.manual_seed(0)
        return Trainer(cfg, _teacher("var"), TorchEngineFactory())

    seen = []
    ref = make()
    ref.callbacks.append(OnStep(lambda tr, m: seen.append(m) if "generator/loss" in m else None))
    ref.fit()
    assert len(seen) == 4 and all("generator/regression_loss" in m for m in seen)
    # four generator steps, 3 per block (ode_pairs_per_call): resume inside the second block
    for stop in (2 + 3 * 2, 2 + 3 * 4):
        a = make()
        a.fit(checkpoint_dir=tmp_path / str(stop), max_iterations=stop)
        b = make()
        b.resume_latest(tmp_path / str(stop))
        b.fit()
        _assert_same(_snapshot(b), _snapshot(ref))


def test_strided_pairs_give_each_generator_step_its_own_rows_and_resume_inside_a_block():
    from dd2dist.train.batches import BatchSource

    teacher = _teacher("var")
    cfg = _cfg(0)  # batch 4, 3 pairs per sampler call
    src = BatchSource(cfg, 0, 1, torch.device("cpu"), teacher, None, teacher.codebook())
    K1 = 3  # generator steps at phase iterations 2, 5, 8, ... (K = 2)
    steps = [src.ode_pairs(20 + j * K1 + 2, j * K1 + 2, 0, teacher, stride=K1) for j in range(6)]
    eps = torch.stack([e for e, _, _ in steps])
    assert all(not torch.equal(eps[i], eps[j]) for i in range(6) for j in range(i))
    fresh = BatchSource(cfg, 0, 1, torch.device("cpu"), teacher, None, teacher.codebook())
    again = fresh.ode_pairs(20 + 4 * K1 + 2, 4 * K1 + 2, 0, teacher, stride=K1)  # resumed at the 5th step
    assert torch.equal(again[0], steps[4][0]) and torch.equal(again[2], steps[4][2])


def test_the_default_ode_steps_converge_on_close_codes_where_8_steps_do_not():
    """64 unit codes in R^8 in close pairs (like a trained LlamaGen codebook): 8 Heun steps leave a map that differs
    from the converged one on many tokens, the default stage2.ode_steps does not."""

    def agreement(num_steps: int) -> float:
        ref = pf_ode_codes(lp, codebook, eps, 128)
        return float((pf_ode_codes(lp, codebook, eps, num_steps) == ref).float().mean())

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 8, generator=gen)
    codebook = torch.nn.functional.normalize(centres.repeat(4, 1) + 0.1 * torch.randn(64, 8, generator=gen), dim=-1)
    lp = torch.log_softmax(1.5 * torch.randn(2000, 1, 64, generator=gen), -1)
    eps = torch.randn(2000, 1, 8, generator=gen)
    coarse, default = agreement(8), agreement(Stage2Config().ode_steps)
    assert default > 0.97, default
    assert coarse < default - 0.05, (coarse, default)


@pytest.mark.parametrize("ode_steps, warns", [(1, True), (16, False)])
def test_the_first_block_of_pairs_logs_how_converged_its_map_is(caplog, ode_steps, warns):
    """BatchSource measures, once, how many tokens of its first regression pairs 4x the ODE steps reproduce, and
    warns, naming the field, when the map is far from converged (1 step), not when it has converged (16)."""
    import logging

    from dd2dist.train.batches import BatchSource

    teacher = _teacher("llamagen")
    cfg = ExperimentConfig(teacher=TeacherConfig(family="llamagen", llamagen=LG_ARCH, sampling=_sampling("llamagen")),
                           stage2=Stage2Config(ode_init_steps=2, ode_steps=ode_steps, ode_pairs_per_call=2,
                                               batch_size=16))
    engine = TorchEngineFactory().teacher(teacher)
    source = BatchSource(cfg, 0, 1, torch.device("cpu"), teacher, engine, teacher.codebook().float())
    with caplog.at_level(logging.INFO, logger="dd2dist.train"):
        source.ode_pairs(0, 0, 0, teacher)
        source.ode_pairs(1, 1, 0, teacher)  # same block: no second check
    records = [r for r in caplog.records if f"stage2.ode_steps={ode_steps}:" in r.getMessage()]
    assert len(records) == 1
    if warns:
        assert source.ode_map_agreement < 0.5 and records[0].levelno == logging.WARNING
    else:
        assert source.ode_map_agreement > 0.95 and records[0].levelno == logging.INFO
