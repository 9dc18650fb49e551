"""DD2's rules per phase: which networks exist, how each one's optimizer is set, which loss each role takes, and
what happens when a phase is entered. Pure (config in, plain data out), so the trainer stays generic: it builds
the engines a group lists, runs the loss a role is given, and carries out the entry actions in order.

Groups are the sets of networks that live together: the head-only stage-1 student, the full stage-1 student, and
the stage-2 generator/guidance pair that the regression, CSD, alignment and after-alignment phases share. A group's
name is written into checkpoints (``state.json``: ``engine_group``), so the names are part of the format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dd2dist.engine.optim import OptimSpec
from dd2dist.method import optim_specs
from dd2dist.method.schedule import Phase, Schedule, build_schedule
from dd2dist.method.steps import (
    StepContext,
    StepResult,
    categorical_generator_step,
    generator_step,
    gts_step,
    guidance_step,
    regression_step,
)

LossFn = Callable[[StepContext], StepResult]

# export names (the Ray layer writes export/<name>.safetensors)
STAGE1_EXPORT_NAME = "stage1_student"  # the stage-1 student as stage 2 receives it
REGRESSION_EXPORT_NAME = "generator_regression"  # the generator as the regression left it (DD1-style baseline)


@dataclass(frozen=True)
class NetSpec:
    """One trainable network: its role (the engine's name), its optimizer, and whether only its head trains (the
    backbone then stays frozen, and the loss still gets the whole network). ``zero_head_output``: the head's
    output layer is zeroed when the network is built from the weights it starts from (not when a checkpoint
    restores it)."""

    role: str
    optim: OptimSpec
    head_only: bool = False
    zero_head_output: bool = False


@dataclass(frozen=True)
class EMASpec:
    """The EMA kept of one role's weights (its exported form), and the extra decay caps tracked beside it."""

    role: str
    ema_max: float
    warmup: str
    rampup: float
    compare: tuple[float, ...] = ()


@dataclass(frozen=True)
class EngineGroup:
    """The networks that live together over consecutive phases.

    ``hands_over``: the role whose weights start the next group's networks. ``export_incoming``: the export name of
    the weights this group starts from when an earlier group of the same run hands them over.
    ``fresh_start_warning``: logged when the group starts with no handed-over or given weights.
    """

    name: str
    nets: tuple[NetSpec, ...]
    ema: EMASpec | None = None
    hands_over: str | None = None
    export_incoming: str | None = None
    fresh_start_warning: str | None = None


@dataclass(frozen=True)
class LoadEMA:
    """The role continues from its EMA weights (performance alignment (i))."""

    role: str


@dataclass(frozen=True)
class Export:
    """Hand the role's current (non-EMA) weights to the export callbacks under ``name``."""

    name: str
    role: str


@dataclass(frozen=True)
class ResetOptimizer:
    """Fresh optimizer moments and a new LR warm-up for the role."""

    role: str
    optim: OptimSpec


EntryAction = LoadEMA | Export | ResetOptimizer

_GROUP_OF = {"gts_head": "stage1_head", "gts": "stage1"}  # every other kind: the stage-2 pair

_LOSSES: dict[tuple[str, str], LossFn] = {
    ("gts_head", "student_head"): gts_step("student_head"),
    ("gts", "student"): gts_step("student"),
    ("regress", "generator"): regression_step,
    ("alternate", "guidance"): guidance_step,
    ("alternate", "generator"): generator_step,
    ("guidance_only", "guidance"): guidance_step,
    ("categorical", "generator"): categorical_generator_step,
}


class DD2Phases:
    """What the trainer asks about a DD2 run (``cfg``: an :class:`dd2dist.config.ExperimentConfig`)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.schedule: Schedule = build_schedule(cfg)

    def group_name(self, phase: Phase) -> str:
        return _GROUP_OF.get(phase.kind, "stage2")

    def group(self, name: str, phase: Phase | None) -> EngineGroup:
        """The networks of group ``name`` as built while ``phase`` is current (None: the schedule is done)."""
        cfg = self.cfg
        if name == "stage1_head":
            return EngineGroup(name, (NetSpec("student_head", optim_specs.stage1_spec(cfg), head_only=True),),
                               hands_over="student_head")
        if name == "stage1":
            return EngineGroup(name, (NetSpec("student", optim_specs.stage1_spec(cfg)),), hands_over="student")
        if name != "stage2":
            raise KeyError(f"no engine group named {name!r}")
        # the regression phase builds the generator with its own optimizer; entering CSD resets it (entry_actions)
        regress = phase is not None and phase.kind == "regress"
        gen = optim_specs.regression_spec(cfg) if regress else optim_specs.generator_spec(cfg)
        s2 = cfg.stage2
        nets = (NetSpec("generator", gen),)
        if cfg.student.generator_output != "categorical":  # a categorical generator's loss is exact: no guidance
            # a guidance network built on the teacher's velocity starts as exactly the teacher: its head is the
            # correction, zero until FCS has seen the generator
            nets += (NetSpec("guidance", optim_specs.guidance_spec(cfg),
                             zero_head_output=s2.guidance_base == "teacher"),)
        return EngineGroup(
            name, nets,
            ema=EMASpec("generator", s2.ema_max, s2.ema_warmup, s2.ema_rampup, tuple(s2.ema_compare)),
            export_incoming=STAGE1_EXPORT_NAME,
            fresh_start_warning="stage 2 starts without a stage-1 model in this run: generator and guidance are the "
                                "teacher backbone + a zero head (docs/method.md §13.1, Tab.4: expect a much worse "
                                "start)")

    def loss(self, phase: Phase, role: str) -> LossFn:
        try:
            return _LOSSES[(phase.kind, role)]
        except KeyError:
            raise KeyError(f"role {role!r} does not train in a {phase.kind!r} phase") from None

    def entry_actions(self, index: int) -> tuple[EntryAction, ...]:
        """What runs once when phase ``index`` is entered, in order (not again when a run resumes inside it)."""
        phases = self.schedule.phases
        phase = phases[index]
        actions: list[EntryAction] = []
        if phase.ema_to_generator_on_entry:
            actions.append(LoadEMA("generator"))
        if phase.kind == "alternate" and index > 0 and phases[index - 1].kind == "regress":
            # CSD after the regression start: fresh AdamW moments and the CSD warm-up from lr_start (the
            # regression's second moments are of another loss's scale)
            actions += [Export(REGRESSION_EXPORT_NAME, "generator"),
                        ResetOptimizer("generator", optim_specs.generator_spec(self.cfg))]
        return tuple(actions)

    def step_metrics(self, phase: Phase) -> dict[str, float]:
        """Values logged with every step of ``phase``."""
        return {"K": float(phase.guidance_per_generator)} if phase.kind == "alternate" else {}
