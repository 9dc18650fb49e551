"""The stateful trainer: exact resume, bit-identical checkpoints, NaN guard, phase assertions, metrics, data."""

import math

import pytest
import torch

from dd2dist.conditions import Sampling
from dd2dist.config.schema import (
    AlignmentConfig,
    DataConfig,
    EngineConfig,
    ExperimentConfig,
    Stage1Config,
    Stage2Config,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.teachers import VARConfig, VARVQConfig, build_family
from dd2dist.train import JsonlLogger, LogMetrics, OnStep, Trainer, TrainerCallback
from dd2dist.train.checkpoint import latest_checkpoint

ARCH = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4,
                 tokenizer=VARVQConfig(vocab_size=16, embed_dim=4))


def _cfg(**kw) -> ExperimentConfig:
    base = dict(
        stages=("stage1", "stage2", "alignment"),
        teacher=TeacherConfig(family="var", var=ARCH,
                              sampling=Sampling(guidance_scale=1.5, guidance_schedule="var_linear")),
        student=StudentConfig(head_width=16, head_depth=1, time_embed_dim=8),
        stage1=Stage1Config(head_only_steps=3, steps=3, lr=1e-3, warmup_steps=2, batch_size=4),
        stage2=Stage2Config(generator_steps=3, guidance_per_generator=2, generator_lr=5e-4, guidance_lr=1e-3,
                            warmup_guidance_steps=4, fcs_samples=2, batch_size=4),
        alignment=AlignmentConfig(enabled=True, after_generator_steps=3, guidance_only_steps=2,
                                  guidance_per_generator_after=1, generator_steps_after=2),
        tracking=TrackingConfig(log_every=1),
    )
    base.update(kw)
    return ExperimentConfig(**base)


TOTAL = 3 + 3 + 9 + 2 + 4


def _teacher():
    torch.manual_seed(0)
    return build_family("var", var=ARCH)


def _trainer(cfg=None, **kw) -> Trainer:
    return Trainer(cfg or _cfg(), _teacher(), TorchEngineFactory(), **kw)


def _snapshot(tr: Trainer) -> dict:
    """Everything that must match between two runs (weights, optimizer moments, EMA, counters, LR)."""
    out = {"state": tr.state, "group": tr.engine_group}
    for name, eng in tr.engines.items():
        out[f"{name}/weights"] = eng.full_state_dict()
        out[f"{name}/optim"] = eng.optimizer.state_dict()
        out[f"{name}/steps"] = eng.optimizer_steps
        out[f"{name}/lr"] = eng.lr
    if tr.ema is not None:
        out["ema"] = [t.clone() for t in tr.ema.shadow]
        out["ema_updates"] = tr.ema.updates
    return out


def _assert_same(a, b, where="root"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def uninterrupted():
    tr = _trainer()
    tr.fit()
    assert tr.done and tr.state.iteration == TOTAL
    return _snapshot(tr)


@pytest.mark.parametrize("stop_at", [2, 8, 16, 18])  # in: head-only, stage 2 mid-block, alignment, after it
def test_resume_equals_uninterrupted(tmp_path, uninterrupted, stop_at):
    first = _trainer()
    first.fit(checkpoint_dir=tmp_path, checkpoint_every=1000, max_iterations=stop_at)
    assert first.state.iteration == stop_at
    del first
    second = _trainer()
    loaded = second.resume_latest(tmp_path)
    assert loaded is not None and loaded.name == f"step_{stop_at:08d}"
    second.fit()
    _assert_same(_snapshot(second), uninterrupted)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    hooked = []

    class Hook(TrainerCallback):
        def on_checkpoint(self, trainer, d, metrics):  # the checkpoint is complete when the callback runs
            assert d.is_dir() and (d / "state.json").is_file() and not d.name.endswith(".tmp")
            hooked.append((d, trainer.state.iteration, dict(metrics)))

    tr = _trainer(callbacks=[Hook()])
    tr.extra_state["mlflow_run_id"] = "abc123"
    tr.fit(checkpoint_dir=tmp_path, checkpoint_every=5, max_iterations=11, keep_last=2)
    assert [s for _, s, _ in hooked] == [5, 10, 11]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010", "step_00000011"]  # pruned to 2
    assert "guidance/loss" in hooked[-1][2] or "generator/loss" in hooked[-1][2]
    before = _snapshot(tr)
    rng_before = torch.get_rng_state()
    torch.manual_seed(1234)  # disturb the global RNG: load must restore it
    other = _trainer()
    other.load(latest_checkpoint(tmp_path))
    _assert_same(_snapshot(other), before)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert other.extra_state == {"mlflow_run_id": "abc123"}
    assert other.phase.name == tr.phase.name == "stage2"


def test_checkpoint_refuses_other_schedule(tmp_path):
    tr = _trainer()
    tr.fit(checkpoint_dir=tmp_path, max_iterations=2)
    other = _trainer(_cfg(stages=("stage1", "stage2"), alignment=AlignmentConfig()))
    with pytest.raises(ValueError, match="phases"):
        other.resume_latest(tmp_path)


def test_nan_guard_skips_the_step(uninterrupted):
    tr = _trainer()
    tr.fit(max_iterations=7)  # next: iteration 7 = stage-2 guidance step
    assert tr.phase.role_at(tr.state.phase_iter) == "guidance"
    guidance = tr.engines["guidance"]
    weights, steps = guidance.full_state_dict(), guidance.optimizer_steps
    real_loss = tr._loss

    def poisoned(role, micro, phase):
        loss, m, b = real_loss(role, micro, phase)
        return loss * math.nan, m, b

    tr._loss = poisoned
    tr.fit(max_iterations=8)
    assert tr.state.skipped == {"guidance": 1}
    assert tr.last_metrics["guidance/skipped"] == 1.0 and tr.last_metrics["skipped_total"] == 1.0
    _assert_same(guidance.full_state_dict(), weights)
    assert guidance.optimizer_steps == steps
    assert all(p.grad is None for p in guidance.module.parameters())
    tr._loss = real_loss
    tr.fit()  # and training goes on
    assert tr.done and tr.engines["guidance"].optimizer_steps == uninterrupted["guidance/steps"] - 1


def test_phase_switch_assertions_fire():
    tr = _trainer()
    tr.fit(max_iterations=7)
    tr._set_role("generator")
    tr.assert_modes("generator")
    tr.engines["guidance"].module.requires_grad_(True)  # left trainable by mistake
    with pytest.raises(AssertionError, match="guidance"):
        tr.assert_modes("generator")
    tr._set_role("guidance")
    tr.teacher_engine.module.train()  # teacher must never be in train mode
    with pytest.raises(AssertionError, match="teacher"):
        tr.assert_modes("guidance")


def test_head_only_phase_freezes_backbone():
    tr = _trainer()
    tr.fit(max_iterations=1)
    assert tr.engine_group == "stage1_head"
    tr._set_role("student_head")
    tr.student_backbone.requires_grad_(True)
    with pytest.raises(AssertionError, match="backbone"):
        tr.assert_modes("student_head")


def test_metrics_logged_per_step(tmp_path):
    logger = JsonlLogger(tmp_path / "m.jsonl")
    tr = _trainer(callbacks=[LogMetrics(logger)])
    tr.fit(max_iterations=TOTAL)
    records = logger.read()
    steps = [r["step"] for r in records if "step" in r]
    assert steps == list(range(1, TOTAL + 1))  # every iteration once: no gaps, no duplicates
    gen = [r for r in records if "generator/loss" in r]
    assert gen and all(k in gen[0] for k in ("generator/grad_norm", "generator/lr", "K", "samples_per_s",
                                                "step_time_s", "ema/updates"))
    tags = [r["tags"]["phase"] for r in records if "tags" in r]
    assert tags == ["stage1_head", "stage1", "stage2", "align", "stage2_after"]
    # generator LR warm-up: 4 guidance iterations / K=2 -> 2 generator steps, from lr_start to lr
    lrs = [r["generator/lr"] for r in gen]
    assert lrs[0] == pytest.approx(1e-6 + (5e-4 - 1e-6) / 2) and lrs[1] == pytest.approx(5e-4)


class ListStream:
    """A resumable token stream: batch i is a pure function of i (like dd2dist.data.TokenStream)."""

    def __init__(self, num_tokens, vocab, batch=4):
        self.step, self.num_tokens, self.vocab, self.batch = 0, num_tokens, vocab, batch

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 + self.step)
            ids = torch.randint(self.vocab, (self.batch, self.num_tokens), generator=g)
            labels = torch.randint(4, (self.batch,), generator=g)
            self.step += 1
            yield ids, labels

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]

    def metrics(self):
        return {"data/samples": self.step * self.batch, "data/samples_skipped": 0}


def test_stage1_from_data_stream_resumes_exactly(tmp_path):
    cfg = _cfg(stages=("stage1",), data=DataConfig(source="shards", shards="unused"), alignment=AlignmentConfig())

    def make():
        return Trainer(cfg, _teacher(), TorchEngineFactory(), data=ListStream(14, 16))

    ref = make()
    ref.fit()
    assert ref.data.step == 6
    a = make()
    a.fit(checkpoint_dir=tmp_path, max_iterations=4)
    b = make()
    b.resume_latest(tmp_path)
    assert b.data.step == 4
    b.fit()
    _assert_same(_snapshot(b), _snapshot(ref))


def test_callbacks_see_every_iteration_and_can_stop():
    seen = []

    def cb(trainer, metrics):
        seen.append((trainer.state.iteration, trainer.phase.name))
        if trainer.state.iteration == 9:
            trainer.stop = True

    tr = _trainer(callbacks=[OnStep(cb)])
    tr.fit()
    assert [i for i, _ in seen] == list(range(1, 10)) and tr.state.iteration == 9
    tr.fit()
    assert tr.done and len(seen) == TOTAL


def test_stage2_only_run_starts_from_given_student():
    s1 = _trainer(_cfg(stages=("stage1",), alignment=AlignmentConfig()))
    s1.fit()
    student = s1.student_state_dict()
    s2 = _trainer(_cfg(stages=("stage2",), alignment=AlignmentConfig()), init_student=student)
    s2._ensure_engines(s2.phase)
    for name in ("generator", "guidance"):
        _assert_same(s2.engines[name].full_state_dict(), student, name)
    _assert_same(s2.ema.shadow, s2.engines["generator"].local_param_tensors(), "ema")


def test_teacher_based_guidance_starts_with_a_zero_correction_and_resumes_exactly(tmp_path):
    """stage2.guidance_base=teacher: ψ is the stage-1 student with its head's output layer zeroed (the generator is
    the student unchanged); a checkpoint inside stage 2 restores ψ's trained output layer, not a zeroed one."""
    def cfg(stages):
        return _cfg(stages=stages, alignment=AlignmentConfig(),
                    stage2=Stage2Config(generator_steps=3, guidance_per_generator=2, generator_lr=5e-4,
                                        guidance_lr=1e-3, warmup_guidance_steps=4, fcs_samples=2, batch_size=4,
                                        guidance_base="teacher"))

    s1 = _trainer(cfg(("stage1",)))
    s1.fit()
    student = s1.student_state_dict()
    s2 = _trainer(cfg(("stage2",)), init_student=student)
    s2._ensure_engines(s2.phase)
    _assert_same(s2.engines["generator"].full_state_dict(), student, "generator")
    guidance = s2.engines["guidance"].full_state_dict()
    zeroed = {"head.final.linear.weight", "head.final.linear.bias"}
    _assert_same({k: v for k, v in guidance.items() if k not in zeroed},
                 {k: v for k, v in student.items() if k not in zeroed}, "guidance")
    assert all(not guidance[k].any() for k in zeroed) and all(student[k].any() for k in zeroed)
    s2.fit()
    assert s2.engines["guidance"].full_state_dict()["head.final.linear.weight"].any()
    end = _snapshot(s2)
    a = _trainer(cfg(("stage2",)), init_student=student)
    a.fit(checkpoint_dir=tmp_path, max_iterations=5)
    b = _trainer(cfg(("stage2",)), init_student=student)
    b.resume_latest(tmp_path)
    b.fit()
    _assert_same(_snapshot(b), end)


class Exports(TrainerCallback):
    """Records every export: (name, weights, iteration, engine group at the time)."""

    def __init__(self):
        self.got = []

    def on_export(self, trainer, name, state):
        self.got.append((name, {k: v.clone() for k, v in state.items()}, trainer.state.iteration,
                         trainer.engine_group))


def test_export_callback_gets_the_stage1_student_once_before_stage2(tmp_path):
    exports = Exports()
    got = exports.got
    tr = _trainer(_cfg(alignment=AlignmentConfig(), stages=("stage1", "stage2")), callbacks=[exports])
    tr.fit(max_iterations=6)  # the end of stage 1 (3 head-only + 3 full steps): no export yet
    assert got == []
    stage1 = tr.student_state_dict()
    tr.fit()
    assert len(got) == 1
    name, state, iteration, group = got[0]
    assert name == "stage1_student"
    assert iteration == 6 and group == "stage1"  # called before the stage-2 engines replace the student
    _assert_same(state, stage1)
    # a run resumed inside stage 2 has exported it already: no second call
    a = _trainer(_cfg(alignment=AlignmentConfig(), stages=("stage1", "stage2")))
    a.fit(checkpoint_dir=tmp_path, max_iterations=8)
    later = Exports()
    b = _trainer(_cfg(alignment=AlignmentConfig(), stages=("stage1", "stage2")), callbacks=[later])
    b.resume_latest(tmp_path)
    b.fit()
    assert later.got == []


def test_online_stage1_batches_follow_the_teachers_declared_sampler_capability():
    with_lp = _trainer()
    x0, _, lp = with_lp.batches.stage1(0, 0)
    assert type(with_lp.teacher_engine.module).sample_returns_log_probs and lp.shape == (4, 14, 16)
    teacher = _teacher()
    teacher.sample_returns_log_probs = False  # a sampler without log-probs: GTS then computes them itself
    without = Trainer(_cfg(), teacher, TorchEngineFactory())
    same_x0, _, none = without.batches.stage1(0, 0)
    assert none is None and torch.equal(same_x0, x0)


def test_grad_accum_micro_batches_get_balanced_distinct_labels():
    tr = _trainer(_cfg(engine=EngineConfig(grad_accum=2)))
    a, b = (tr.batches.conditions_for(4, 3, micro, "x").labels for micro in (0, 1))  # iteration 3, micro-batches 0, 1
    assert torch.equal(torch.cat([a, b]), (torch.arange(8) + 3 * 2 * 4) % 4)  # one unbroken cycle over 4 classes
    tr = _trainer(_cfg(engine=EngineConfig(grad_accum=2)))
    tr.fit(max_iterations=8)  # and the trainer runs with accumulation (loss / 2 per micro-batch)
    assert tr.engines["guidance"].optimizer_steps + tr.engines["generator"].optimizer_steps == 2


def test_llamagen_trainer_runs_and_resumes_exactly(tmp_path):
    from dd2dist.teachers import LlamaGenConfig

    arch = LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=2, num_classes=3)  # snap teacher: mlp-adapter students
    cfg = _cfg(stages=("stage1", "stage2"), alignment=AlignmentConfig(),
               teacher=TeacherConfig(family="llamagen", llamagen=arch, sampling=Sampling(guidance_scale=2.0)),
               stage1=Stage1Config(head_only_steps=0, steps=3, batch_size=4))

    def make():
        torch.manual_seed(0)
        return Trainer(cfg, build_family("llamagen", llamagen=arch), TorchEngineFactory())

    ref = make()
    ref.fit()
    assert ref.done and ref.state.iteration == 3 + 9
    a = make()
    a.fit(checkpoint_dir=tmp_path, max_iterations=5)
    b = make()
    b.resume_latest(tmp_path)
    b.fit()
    _assert_same(_snapshot(b), _snapshot(ref))


def test_bf16_autocast_runs_with_fp32_ema():
    tr = _trainer(_cfg(engine=EngineConfig(precision="bf16")))
    tr.fit(max_iterations=12)
    assert tr.state.skipped == {} and math.isfinite(tr.last_metrics["generator/loss"])
    assert all(s.dtype == torch.float32 for s in tr.ema.shadow)
    assert all(p.dtype == torch.float32 for p in tr.engines["generator"].module.parameters())  # fp32 master weights
    a, b = _trainer(_cfg(engine=EngineConfig(precision="bf16"))), _trainer()
    a.fit(max_iterations=3)
    b.fit(max_iterations=3)
    la, lb = a.last_metrics["student_head/loss"], b.last_metrics["student_head/loss"]
    assert la != lb and la == pytest.approx(lb, rel=0.02)  # autocast really ran, and only rounding differs


def test_bf16_teacher_gets_fp32_students():
    teacher = _teacher().to(torch.bfloat16)
    tr = Trainer(_cfg(), teacher, TorchEngineFactory())
    tr.fit(max_iterations=9)
    assert {p.dtype for e in tr.engines.values() for p in e.module.parameters()} == {torch.float32}
    assert tr.state.skipped == {} and math.isfinite(tr.last_metrics["generator/loss"])


def test_data_stream_counters_are_logged_with_the_losses(tmp_path):
    cfg = _cfg(stages=("stage1",), data=DataConfig(source="shards", shards="unused"), alignment=AlignmentConfig())
    logger = JsonlLogger(tmp_path / "m.jsonl")
    Trainer(cfg, _teacher(), TorchEngineFactory(), callbacks=[LogMetrics(logger)], data=ListStream(14, 16)).fit()
    records = [r for r in logger.read() if "step" in r]
    assert records and all("data/samples" in r and "data/samples_skipped" in r for r in records)
    assert records[-1]["data/samples"] == 6 * 4  # 6 stage-1 iterations of batch 4


def test_ema_compare_tracks_other_caps_exports_them_and_resumes(tmp_path):
    """stage2.ema_compare: extra EMAs on the same trajectory, saved in checkpoints (exact resume) and exported."""
    from dataclasses import replace

    from safetensors.torch import load_file

    base = _cfg()
    cfg = _cfg(stage2=replace(base.stage2, ema_max=0.9, ema_compare=(0.9, 0.2)))
    whole = _trainer(cfg)
    whole.fit()
    assert sorted(whole.ema_compare) == [0.2, 0.9] and whole.ema_compare[0.2].updates == whole.ema.updates > 0
    # the cap equal to ema_max is the main EMA exactly; another cap averages differently
    assert all(torch.equal(a, b) for a, b in zip(whole.ema_compare[0.9].shadow, whole.ema.shadow))
    assert any(not torch.equal(a, b) for a, b in zip(whole.ema_compare[0.2].shadow, whole.ema.shadow))

    first = _trainer(cfg)
    first.fit(checkpoint_dir=tmp_path / "ck", checkpoint_every=1000, max_iterations=12)  # inside stage 2
    second = _trainer(cfg)
    second.resume_latest(tmp_path / "ck")
    second.fit()
    for cap in (0.2, 0.9):
        _assert_same(second.ema_compare[cap].shadow, whole.ema_compare[cap].shadow, f"ema {cap}")
    with pytest.raises(ValueError, match="ema_compare"):  # a checkpoint without them does not silently start fresh
        _trainer(_cfg(stage2=replace(base.stage2, ema_compare=(0.5,)))).resume_latest(_plain_checkpoint(tmp_path))

    export = tmp_path / "export"
    main = load_file(str(whole.export_generator(export)))
    same, other = (load_file(str(export / f"generator_ema{cap}.safetensors")) for cap in ("0.9", "0.2"))
    assert set(main) == set(same) == set(other)
    assert all(torch.equal(main[k], same[k]) for k in main)
    assert any(not torch.equal(main[k], other[k]) for k in main)
    assert all(torch.equal(v, whole.generator_state_dict(ema_cap=0.2)[k]) for k, v in other.items())
    with pytest.raises(KeyError, match="0.7"):
        whole.generator_state_dict(ema_cap=0.7)


def _plain_checkpoint(tmp_path):
    tr = _trainer()
    tr.fit(checkpoint_dir=tmp_path / "plain", checkpoint_every=1000, max_iterations=12)
    return tmp_path / "plain"


# ---- run safety: manifests, fallback resume, stop requests ------------------------------------------------------


def _shards_cfg():
    return _cfg(stages=("stage1", "stage2"), data=DataConfig(source="shards", shards="unused"),
                alignment=AlignmentConfig())


def _shards_trainer(**kw) -> Trainer:
    return Trainer(_shards_cfg(), _teacher(), TorchEngineFactory(), data=ListStream(14, 16), **kw)


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory):
    """An uninterrupted stage-1 + stage-2 run on a data stream, and checkpoints at 4, 8, 12 of the same run."""
    ref = _shards_trainer()
    ref.fit()
    root = tmp_path_factory.mktemp("ck")
    _shards_trainer().fit(checkpoint_dir=root, checkpoint_every=4, max_iterations=12, keep_last=5)
    return _snapshot(ref), root


PARTS = {"engine": "engines/generator/module.pt", "ema": "ema/rank0.pt", "rng": "rng/rank0.pt",
         "data": "data/rank0.json"}  # one file of each part (tests/test_run_safety_tiny.py damages each in turn)


def test_every_checkpoint_has_a_manifest_of_all_its_files(shards_run):
    from dd2dist.train import manifest

    _, root = shards_run
    step = root / "step_00000012"
    listed = manifest.read_manifest(step)["files"]
    on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted([*listed, "manifest.json"]) == on_disk
    assert set(PARTS.values()) | {"state.json"} <= set(listed)
    assert manifest.verify(step) == [] and manifest.read_manifest(step)["iteration"] == 12


def test_no_verified_checkpoint_is_an_error_not_a_fresh_start(tmp_path, shards_run):
    import shutil

    from dd2dist.train.trainer import NoVerifiedCheckpoint

    _, root = shards_run
    shutil.copytree(root, tmp_path / "ck")
    for step in (4, 8, 12):
        (tmp_path / "ck" / f"step_{step:08d}" / "rng" / "rank0.pt").unlink()
    with pytest.raises(NoVerifiedCheckpoint, match=r"step_00000004: rng/rank0.pt: missing"):
        _shards_trainer().resume_latest(tmp_path / "ck")
    assert _shards_trainer().resume_latest(tmp_path / "empty") is None


def test_pruning_keeps_the_newest_checkpoint_that_verifies(tmp_path, shards_run):
    import shutil

    from dd2dist.train.checkpoint import prune

    _, root = shards_run
    shutil.copytree(root, tmp_path / "ck")
    for step in (8, 12):  # the two newest are damaged (truncated: the cheap size check sees it)
        path = tmp_path / "ck" / f"step_{step:08d}" / "ema" / "rank0.pt"
        path.write_bytes(path.read_bytes()[:-10])
    prune(tmp_path / "ck", 2)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000004", "step_00000008", "step_00000012"]
    prune(tmp_path / "ck", 1)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000004", "step_00000012"]


def test_stop_request_checkpoints_at_that_iteration_and_resumes_exactly(tmp_path, shards_run):
    from dd2dist.train.stop import StopFlag

    reference, _ = shards_run
    flag = StopFlag()

    def ask_at_10(trainer, metrics):
        if trainer.state.iteration == 9:  # the next iteration's check sees it: the one after 10 never runs
            flag.request("test: SIGTERM")

    first = _shards_trainer(stop_source=flag.get, callbacks=[OnStep(ask_at_10)])
    first.fit(checkpoint_dir=tmp_path, checkpoint_every=1000)
    assert first.state.iteration == 10 and first.preempted.reason == "test: SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]
    second = _shards_trainer(stop_source=StopFlag().get)
    assert second.resume_latest(tmp_path).name == "step_00000010"
    second.fit(checkpoint_dir=tmp_path, checkpoint_every=1000)
    assert second.preempted is None and second.done
    _assert_same(_snapshot(second), reference)


def test_stop_request_without_checkpoint_writes_none(tmp_path):
    from dd2dist.train.stop import StopFlag

    flag = StopFlag()
    flag.request("lost the output directory", checkpoint=False)
    tr = _trainer(stop_source=flag.get)
    tr.fit(checkpoint_dir=tmp_path)
    assert tr.state.iteration == 1 and not tr.preempted.checkpoint
    assert list(tmp_path.iterdir()) == []


def test_stop_request_on_the_last_iteration_lets_the_run_finish(tmp_path):
    from dd2dist.train.stop import StopFlag

    flag = StopFlag()
    tr = _trainer(stop_source=flag.get,
                  callbacks=[OnStep(lambda t, m: flag.request("late") if t.state.iteration == TOTAL - 1 else None)])
    tr.fit(checkpoint_dir=tmp_path)
    assert tr.done and tr.preempted is None


def test_consolidation_refuses_a_damaged_checkpoint(tmp_path):
    from dd2dist.eval.run_eval import load_student_weights
    from dd2dist.train.manifest import UnverifiedCheckpoint

    tr = _trainer(_cfg(stages=("stage1",), alignment=AlignmentConfig()))
    tr.fit(checkpoint_dir=tmp_path, max_iterations=4)
    step = latest_checkpoint(tmp_path)
    _assert_same(load_student_weights(step), tr.student_state_dict())
    path = step / "engines" / "student" / "module.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UnverifiedCheckpoint, match="engines/student/module.pt: sha256 differs"):
        load_student_weights(step)


def test_a_var_posterior_head_student_trains_through_every_phase(tmp_path):
    """The head-only VAR phase trains the MLP head alone (the copied code logits stay the teacher's until the full
    stage 1), and the run resumes exactly inside stage 2."""
    student = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True)
    tr = _trainer(_cfg(student=student))
    teacher_head = _teacher().transformer.head.weight.detach().clone()
    tr.fit(max_iterations=3)
    assert torch.equal(tr._whole_nets["student_head"].code_logits.weight, teacher_head)
    tr.fit()
    assert tr.done and all(math.isfinite(v) for v in tr.last_metrics.values())
    end = _snapshot(tr)
    a = _trainer(_cfg(student=student))
    a.fit(checkpoint_dir=tmp_path, max_iterations=10)
    b = _trainer(_cfg(student=student))
    b.resume_latest(tmp_path)
    b.fit()
    _assert_same(_snapshot(b), end)
