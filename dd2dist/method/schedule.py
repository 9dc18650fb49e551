"""What trains when: phases, the alternation of guidance and generator steps, and per-optimizer LR warm-up.

FastGen-style: the schedule is a plain object the trainer asks "which engine steps at iteration i of this
phase?". One iteration = one optimizer step of one engine. The phases come from the config (docs/method.md §10):

  stage1_head   GTS, head only, backbone frozen (VAR; paper 300k)         role: student_head
  stage1        GTS, the full student                                     role: student
  stage2_ode_init  optional: generator regression onto teacher PF-ODE pairs role: generator
  stage2        K guidance (FCS) steps, then 1 generator (CSD) step       roles: guidance, generator
  stage2        (categorical generator outputs) exact-KL generator steps  role: generator
  align         performance alignment: EMA -> generator on entry, then guidance-only steps
  stage2_after  alternation again with the post-alignment K (paper: 2)

LR warm-up is measured in each optimizer's *own* steps (a scheduler never ticks when its optimizer did not
step; see ``dd2dist.engine.optim.OptimSpec.lr_at``); the generator warm-up, given in guidance iterations
(Tab.11), is converted with the stage-2 K by :func:`generator_warmup_steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

PhaseKind = Literal["gts_head", "gts", "regress", "alternate", "guidance_only", "categorical"]
Role = Literal["student_head", "student", "guidance", "generator"]


@dataclass(frozen=True)
class Phase:
    """One phase: ``iterations`` optimizer steps of the roles given by :meth:`role_at`."""

    name: str
    stage: Literal["stage1", "stage2", "alignment"]
    kind: PhaseKind
    iterations: int
    guidance_per_generator: int = 0  # K, for "alternate"
    ema_to_generator_on_entry: bool = False  # performance alignment step (i)

    def role_at(self, i: int) -> Role:
        """The engine that steps at iteration ``i`` (0-based) of this phase."""
        if self.kind == "gts_head":
            return "student_head"
        if self.kind == "gts":
            return "student"
        if self.kind == "guidance_only":
            return "guidance"
        if self.kind in ("regress", "categorical"):
            return "generator"
        return "guidance" if i % (self.guidance_per_generator + 1) < self.guidance_per_generator else "generator"

    @property
    def roles(self) -> tuple[Role, ...]:
        """The engines this phase trains (the others are frozen in it)."""
        return {"gts_head": ("student_head",), "gts": ("student",), "guidance_only": ("guidance",),
                "regress": ("generator",), "categorical": ("generator",),
                "alternate": ("guidance", "generator")}[self.kind]


@dataclass(frozen=True)
class Schedule:
    """The ordered phases of a run."""

    phases: tuple[Phase, ...]

    @property
    def total_iterations(self) -> int:
        return sum(p.iterations for p in self.phases)

    def index_of(self, name: str) -> int:
        for i, p in enumerate(self.phases):
            if p.name == name:
                return i
        raise KeyError(f"no phase named {name!r} in this schedule ({[p.name for p in self.phases]})")


def build_schedule(cfg) -> Schedule:
    """The phases of ``cfg.stages`` (an :class:`ExperimentConfig`).

    With alignment, ``stage2.generator_steps`` generator steps run before it, so ``alignment.after_generator_steps``
    must equal it (they name the same count; a mismatch is refused rather than one of them silently ignored).
    """
    phases: list[Phase] = []
    if "stage1" in cfg.stages:
        if cfg.stage1.head_only_steps > 0:
            phases.append(Phase("stage1_head", "stage1", "gts_head", cfg.stage1.head_only_steps))
        phases.append(Phase("stage1", "stage1", "gts", cfg.stage1.steps))
    s2, al = cfg.stage2, cfg.alignment
    if "stage2" in cfg.stages:
        if s2.ode_init_steps > 0:
            phases.append(Phase("stage2_ode_init", "stage2", "regress", s2.ode_init_steps))
        if cfg.student.generator_output == "categorical":
            phases.append(Phase("stage2", "stage2", "categorical", s2.generator_steps))
        else:
            K = s2.guidance_per_generator
            phases.append(Phase("stage2", "stage2", "alternate", s2.generator_steps * (K + 1), K))
    if "alignment" in cfg.stages:
        if al.after_generator_steps != s2.generator_steps:
            raise ValueError(
                f"alignment.after_generator_steps ({al.after_generator_steps}) must equal stage2.generator_steps "
                f"({s2.generator_steps}): the alignment starts when stage 2's generator steps are done"
            )
        phases.append(Phase("align", "alignment", "guidance_only", al.guidance_only_steps,
                            ema_to_generator_on_entry=True))
        Ka = al.guidance_per_generator_after
        phases.append(Phase("stage2_after", "alignment", "alternate", al.generator_steps_after * (Ka + 1), Ka))
    return Schedule(tuple(phases))


def generator_warmup_steps(warmup_guidance_steps: int, guidance_per_generator: int) -> int:
    """Generator warm-up length in generator steps from one given in guidance iterations (Tab.11: 40k / K)."""
    return math.ceil(warmup_guidance_steps / guidance_per_generator)
