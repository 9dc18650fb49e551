"""DD2's phase rules (dd2dist.method.phases), pure: engine groups, optimizer specs from the config, the loss of each
role, and the actions on entering a phase."""

import subprocess
import sys

import pytest

from dd2dist.config.schema import AlignmentConfig, EngineConfig, ExperimentConfig, Stage1Config, Stage2Config
from dd2dist.engine.optim import OptimSpec
from dd2dist.method.phases import DD2Phases, Export, LoadEMA, ResetOptimizer
from dd2dist.method.steps import generator_step, guidance_step, regression_step


def _cfg(ode_init_steps: int = 0, alignment: bool = True) -> ExperimentConfig:
    return ExperimentConfig(
        stages=("stage1", "stage2", "alignment") if alignment else ("stage1", "stage2"),
        stage1=Stage1Config(head_only_steps=3, steps=4, lr=1e-3, betas=(0.8, 0.9), weight_decay=0.01,
                            warmup_steps=2, grad_clip=0.5),
        stage2=Stage2Config(ode_init_steps=ode_init_steps, ode_init_lr=5e-3, ode_init_warmup_steps=7,
                            generator_steps=3, guidance_per_generator=2, generator_lr=5e-4, guidance_lr=1e-3,
                            lr_start=1e-6, warmup_guidance_steps=5, betas=(0.7, 0.99), weight_decay=0.02,
                            grad_clip=2.0, ema_max=0.99, ema_rampup=5.0, ema_compare=(0.9,)),
        alignment=AlignmentConfig(enabled=True, after_generator_steps=3, guidance_only_steps=2,
                                  guidance_per_generator_after=1, generator_steps_after=2)
        if alignment else AlignmentConfig(),
        engine=EngineConfig(grad_accum=2),
    )


def _phases(method: DD2Phases) -> dict:
    return {p.name: (i, p) for i, p in enumerate(method.schedule.phases)}


def test_every_phase_maps_to_its_engine_group():
    method = DD2Phases(_cfg(ode_init_steps=4))
    assert [(p.name, method.group_name(p)) for p in method.schedule.phases] == [
        ("stage1_head", "stage1_head"), ("stage1", "stage1"), ("stage2_ode_init", "stage2"), ("stage2", "stage2"),
        ("align", "stage2"), ("stage2_after", "stage2")]


def test_optimizer_specs_come_from_the_config():
    method = DD2Phases(_cfg(ode_init_steps=4))
    phases = _phases(method)
    stage1 = OptimSpec(lr=1e-3, betas=(0.8, 0.9), weight_decay=0.01, grad_clip=0.5, lr_start=0.0, warmup_steps=2,
                       grad_accum=2)
    head = method.group("stage1_head", phases["stage1_head"][1])
    assert [(n.role, n.optim, n.head_only) for n in head.nets] == [("student_head", stage1, True)]
    assert head.hands_over == "student_head" and head.ema is None
    full = method.group("stage1", phases["stage1"][1])
    assert [(n.role, n.optim, n.head_only) for n in full.nets] == [("student", stage1, False)]

    common = dict(betas=(0.7, 0.99), weight_decay=0.02, grad_clip=2.0, lr_start=1e-6, grad_accum=2)
    csd = OptimSpec(lr=5e-4, warmup_steps=3, **common)  # 5 guidance iterations / K = 2 -> 3 generator steps
    guidance = OptimSpec(lr=1e-3, warmup_steps=5, **common)
    regression = OptimSpec(lr=5e-3, warmup_steps=7, **common)
    for name, generator in (("stage2_ode_init", regression), ("stage2", csd), ("align", csd), (None, csd)):
        group = method.group("stage2", phases[name][1] if name else None)
        assert [(n.role, n.optim, n.head_only) for n in group.nets] == [
            ("generator", generator, False), ("guidance", guidance, False)], name
    group = method.group("stage2", phases["stage2"][1])
    assert group.hands_over is None and group.export_incoming == "stage1_student" and group.fresh_start_warning
    assert (group.ema.role, group.ema.ema_max, group.ema.rampup, group.ema.compare) == ("generator", 0.99, 5.0,
                                                                                       (0.9,))
    with pytest.raises(KeyError, match="nope"):
        method.group("nope", None)


def test_each_role_of_each_phase_has_its_loss_and_no_other_role_does():
    method = DD2Phases(_cfg(ode_init_steps=4))
    phases = _phases(method)
    assert method.loss(phases["stage2_ode_init"][1], "generator") is regression_step
    assert method.loss(phases["stage2"][1], "generator") is generator_step
    assert method.loss(phases["stage2"][1], "guidance") is guidance_step
    assert method.loss(phases["align"][1], "guidance") is guidance_step
    for _, phase in phases.values():
        for role in phase.roles:
            assert callable(method.loss(phase, role))
    with pytest.raises(KeyError, match="generator"):
        method.loss(phases["align"][1], "generator")
    with pytest.raises(KeyError, match="student"):
        method.loss(phases["stage2"][1], "student")


def test_entry_actions_align_the_generator_and_restart_csd_after_the_regression():
    method = DD2Phases(_cfg(ode_init_steps=4))
    phases = _phases(method)
    csd = method.group("stage2", phases["stage2"][1]).nets[0].optim
    assert method.entry_actions(phases["stage1_head"][0]) == ()
    assert method.entry_actions(phases["stage2_ode_init"][0]) == ()
    assert method.entry_actions(phases["stage2"][0]) == (Export("generator_regression", "generator"),
                                                         ResetOptimizer("generator", csd))
    assert method.entry_actions(phases["align"][0]) == (LoadEMA("generator"),)
    assert method.entry_actions(phases["stage2_after"][0]) == ()
    plain = DD2Phases(_cfg(ode_init_steps=0))  # no regression: CSD starts with nothing to export or reset
    assert method.entry_actions(_phases(plain)["stage2"][0]) == ()


def test_step_metrics_name_k_in_alternating_phases_only():
    method = DD2Phases(_cfg())
    phases = _phases(method)
    assert method.step_metrics(phases["stage2"][1]) == {"K": 2.0}
    assert method.step_metrics(phases["stage2_after"][1]) == {"K": 1.0}
    assert method.step_metrics(phases["align"][1]) == {} and method.step_metrics(phases["stage1"][1]) == {}


def test_the_method_imports_neither_ray_nor_deepspeed():
    code = ("import sys, dd2dist.method.phases, dd2dist.method.steps, dd2dist.method.optim_specs; "
            "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
