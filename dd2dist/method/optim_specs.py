"""Each DD2 network's optimizer settings, read from the config (docs/method.md §10.3)."""

from __future__ import annotations

from dd2dist.engine.optim import OptimSpec
from dd2dist.method.schedule import generator_warmup_steps


def stage1_spec(cfg) -> OptimSpec:
    """The stage-1 student (head-only and full phases alike)."""
    s1 = cfg.stage1
    return OptimSpec(lr=s1.lr, betas=tuple(s1.betas), weight_decay=s1.weight_decay, grad_clip=s1.grad_clip,
                     lr_start=0.0, warmup_steps=s1.warmup_steps, grad_accum=cfg.engine.grad_accum)


def _stage2_common(cfg) -> dict:
    """What every stage-2 network and phase shares: all but the LR and its warm-up."""
    s2 = cfg.stage2
    return dict(betas=tuple(s2.betas), weight_decay=s2.weight_decay, grad_clip=s2.grad_clip,
                lr_start=s2.lr_start, grad_accum=cfg.engine.grad_accum)


def _generator_lr_scales(cfg) -> tuple[tuple[str, float], ...]:
    """The generator's parameters that step at a multiple of its LR: the neighbour-picks head (fresh weights)."""
    scale = cfg.stage2.neighbour_picks_lr_scale
    return (("neighbour_picks.", scale),) if cfg.student.neighbour_picks != "none" and scale != 1.0 else ()


def generator_spec(cfg) -> OptimSpec:
    """The generator under CSD (or the exact KL); its warm-up is given in guidance iterations (Tab.11) and converted
    with K."""
    s2 = cfg.stage2
    return OptimSpec(lr=s2.generator_lr, warmup_steps=generator_warmup_steps(
        s2.warmup_guidance_steps, s2.guidance_per_generator), lr_scales=_generator_lr_scales(cfg),
        **_stage2_common(cfg))


def guidance_spec(cfg) -> OptimSpec:
    """The guidance network. The paper gives it the same 1e-6 -> lr ramp without stating its length: we use the
    generator's length measured in guidance steps (warmup_guidance_steps)."""
    s2 = cfg.stage2
    return OptimSpec(lr=s2.guidance_lr, warmup_steps=s2.warmup_guidance_steps, **_stage2_common(cfg))


def regression_spec(cfg) -> OptimSpec:
    """The generator during the PF-ODE regression phase: its own LR and warm-up."""
    s2 = cfg.stage2
    return OptimSpec(lr=s2.ode_init_lr, warmup_steps=s2.ode_init_warmup_steps, lr_scales=_generator_lr_scales(cfg),
                     **_stage2_common(cfg))
