"""What a student option costs per training step (``benchmark.py stepcost``): forward + backward time of the three
losses (stage-1 GTS, FCS, CSD) on the teacher of a run, for config variants given as ``--set`` overrides.

Whole-run wall times on a shared 2-core VM drift by tens of percent within a day (the same VAR stage 2 took 295,
338 and 390 s in three demos; docs/results.md §2), so the cost of a change is measured here instead: one process,
one thread (as each demo worker), the run's stage-2 batch, the variants interleaved in alternating order so that
drift cancels, and the median of the repeats with its ratio to the first variant.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dd2dist.conditions import Cond

LOSSES = ("gts", "fcs", "csd")


def _loss_calls(cfg, teacher, batch: int, seed: int) -> dict:
    """One zero-argument call per loss, each building its graph from fixed inputs (no optimizer step: the cost of
    an option is its forward and backward)."""
    from dd2dist.method import csd_loss, fcs_loss, gts_loss
    from dd2dist.method.steps import guidance_base_log_probs
    from dd2dist.nets import StudentNet

    if getattr(teacher, "is_text", False):
        raise ValueError("stepcost draws class labels; a text-conditional teacher is not supported")
    gen = torch.Generator().manual_seed(seed)
    generator, guidance = StudentNet(teacher, cfg.student), StudentNet(teacher, cfg.student)
    codebook = teacher.codebook().float()
    eps = torch.randn(batch, teacher.num_tokens, teacher.embed_dim, generator=gen)
    cond = Cond(labels=torch.arange(batch) % int(teacher.num_classes))
    x0 = codebook[torch.randint(0, teacher.vocab_size, (batch, teacher.num_tokens), generator=gen)]
    s2, sampling = cfg.stage2, cfg.teacher.sampling

    def fcs():
        with torch.no_grad():
            q = generator.generate(eps, cond)
        base = guidance_base_log_probs(cfg, teacher, codebook, q, cond)  # the training step's extra teacher pass
        return fcs_loss(guidance, q, cond, gen, num_samples=s2.fcs_samples, base_log_probs=base,
                        codebook=codebook)[0]

    return {
        "gts": lambda: gts_loss(guidance, teacher, codebook, x0, cond, sampling, gen)[0],
        "fcs": fcs,
        "csd": lambda: csd_loss(generator.generate(eps, cond), teacher, guidance, codebook, cond, sampling, gen,
                                guidance_base=s2.guidance_base)[0],
    }


def step_cost(run_dir: str | Path, variants: list[tuple[str, ...]], repeats: int = 6, iters: int = 8,
              batch: int | None = None, seed: int = 0) -> dict:
    """Median seconds per forward + backward of each loss for each variant (a tuple of ``KEY=VALUE`` overrides of
    the run's config; the first is the baseline of the ratios)."""
    from dd2dist.eval.fidelity import run_config
    from dd2dist.teachers import build_seeded_teacher

    if not variants:
        raise ValueError("stepcost needs at least one variant (an empty one is the run's own config)")
    run_dir = Path(run_dir)
    configs = [run_config(run_dir, v) for v in variants]
    cfg0 = configs[0]
    teacher = build_seeded_teacher(cfg0.teacher, cfg0.seed).freeze()
    batch = int(batch or cfg0.stage2.batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls = [_loss_calls(cfg, teacher, batch, seed) for cfg in configs]
        times: list[dict[str, list[float]]] = [{k: [] for k in LOSSES} for _ in variants]
        for rep in range(repeats):
            order = list(range(len(variants)))[:: 1 if rep % 2 == 0 else -1]
            for k in LOSSES:
                for v in order:
                    calls[v][k]().backward()  # warm-up: allocator and first-call costs stay out of the timing
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        calls[v][k]().backward()
                    times[v][k].append((time.perf_counter() - t0) / iters)
    finally:
        torch.set_num_threads(threads)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    rows = []
    for v, overrides in enumerate(variants):
        row = {"overrides": list(overrides), "seconds": {k: median(times[v][k]) for k in LOSSES}}
        row["ratio"] = {k: row["seconds"][k] / median(times[0][k]) for k in LOSSES}
        rows.append(row)
    return {"run": str(run_dir), "family": teacher.family, "batch": batch, "threads": 1, "repeats": repeats,
            "iterations_per_repeat": iters, "variants": rows}
