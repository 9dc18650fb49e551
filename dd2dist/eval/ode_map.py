"""How converged the teacher's PF-ODE noise -> token map is at each step count (``benchmark.py odemap``): the share
of tokens that ``S`` Heun steps send to the same code as a fine reference integration, on the first AR step and
on all tokens of the teacher's chain.

The PF-ODE regression start (``stage2.ode_init_steps``) regresses the generator onto these pairs, so an unconverged
map is a noisy target. Codebooks with close codes need many steps: on the digits LlamaGen teacher (64 unit codes in
R^8) 8 steps reproduce only about half of all tokens (docs/results.md §3). Run it on a new teacher before choosing
``stage2.ode_steps``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dd2dist.conditions import Cond
from dd2dist.method.ode_init import teacher_ode_tokens


def ode_map_convergence(teacher, sampling, steps=(8, 16, 32), reference_steps: int = 128, samples: int = 1000,
                        seed: int = 0) -> dict:
    """Agreement with ``reference_steps`` for each S in ``steps`` on ``samples`` class-cyclic noise sequences."""
    if getattr(teacher, "is_text", False):
        raise ValueError("odemap draws class labels; a text-conditional teacher is not supported")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % int(teacher.num_classes)
    eps = torch.randn(samples, teacher.num_tokens, teacher.embed_dim, generator=gen)
    cond, codebook = Cond(labels=labels), teacher.codebook().float()
    t0 = time.perf_counter()
    ref = teacher_ode_tokens(teacher, eps, cond, sampling, codebook, reference_steps)
    rows = {}
    for s in steps:
        same = (teacher_ode_tokens(teacher, eps, cond, sampling, codebook, s) == ref).float()
        first = same[:, : teacher.steps[0].stop]  # the first AR step: no prefix that could differ
        rows[str(s)] = {"first_step": float(first.mean()), "all_tokens": float(same.mean()),
                        "per_position": [round(float(v), 4) for v in same.mean(0)]}
    return {"reference_steps": reference_steps, "samples": samples, "steps": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def ode_map_run(run_dir: str | Path, steps=(8, 16, 32), reference_steps: int = 128, samples: int = 1000) -> dict:
    """:func:`ode_map_convergence` on the teacher a run was trained with (its resolved config)."""
    from dd2dist.eval.fidelity import run_config
    from dd2dist.teachers import build_seeded_teacher

    cfg = run_config(run_dir)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    report = ode_map_convergence(teacher, cfg.teacher.sampling, steps, reference_steps, samples, cfg.seed)
    return {"run": str(run_dir), "family": teacher.family, "configured_ode_steps": cfg.stage2.ode_steps, **report}
