"""The DD2 method as pure torch: losses, schedule, phase rules, EMA, seeding (no Ray / DeepSpeed imports)."""

from dd2dist.method.ema import EMA, ema_decay
from dd2dist.method.losses import csd_loss, fcs_loss, gts_loss
from dd2dist.method.ode_init import pf_ode_codes, regression_loss, teacher_ode_tokens
from dd2dist.method.phases import DD2Phases
from dd2dist.method.schedule import Phase, Schedule, build_schedule, generator_warmup_steps
from dd2dist.method.seeding import derive_seed, make_generator

__all__ = [
    "DD2Phases", "EMA", "Phase", "Schedule", "build_schedule", "csd_loss", "derive_seed", "ema_decay",
    "fcs_loss", "generator_warmup_steps", "gts_loss", "make_generator", "pf_ode_codes", "regression_loss",
    "teacher_ode_tokens",
]
