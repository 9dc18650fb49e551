"""Fit and export the compact sampling head of a trained run (:mod:`dd2dist.nets.compact_head`).

    export_compact_head(cfg)   # <run>/export/generator.safetensors -> <run>/export/generator_compact_head.safetensors

The fit runs in one process on the exported EMA generator (no DeepSpeed, no teacher), seeded by ``cfg.seed``, with
the geometry and schedule of ``cfg.compact_head``; its report (relative error of the velocity before and after,
multiply-adds per token, seconds) goes to ``generator_compact_head.json`` beside the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dd2dist.conditions import Cond
from dd2dist.nets.compact_head import COMPACT_HEAD_FILE, CompactHeadSpec, fit_compact_head, save_compact_head


def class_conditions(num_classes: int) -> Callable[[int, torch.Generator], Cond]:
    """Uniform class labels: the conditions a class-conditional generator is sampled with."""
    def draw(batch: int, gen: torch.Generator) -> Cond:
        return Cond(labels=torch.randint(num_classes, (batch,), generator=gen))
    return draw


def export_compact_head(cfg, log: Callable[[str], None] = print,
                        generator_file: str = "generator.safetensors") -> dict:
    """Fit ``cfg.compact_head`` to the run's exported generator and write it to ``<run>/export``; returns the fit
    report (with ``path``). Raises FileNotFoundError without an export, ValueError for a text-conditioned teacher
    (its conditions cannot be drawn without a caption set)."""
    from dd2dist.eval.sampling import load_generator

    export = Path(cfg.output_dir) / "export"
    if not (export / generator_file).is_file():
        raise FileNotFoundError(f"no exported generator at {export / generator_file} (jobs/distill.py writes it "
                                "after stage 2)")
    net, _ = load_generator(export, weights_file=generator_file)
    if getattr(cfg.teacher.arch, "caption_dim", 0):
        raise ValueError("compact_head: a text-conditioned generator needs caption features to fit on; only "
                         "class-conditional runs are supported")
    c = cfg.compact_head
    spec = CompactHeadSpec(c.width, c.depth, c.rank)
    log(f"compact head {spec} for {export / generator_file}: {c.steps} steps of {c.batch_rows} rows")
    head, report = fit_compact_head(
        net.for_sampling(), spec, class_conditions(net.backbone.num_classes), steps=c.steps, lr=c.lr,
        batch_rows=c.batch_rows, pool_sequences=c.pool_sequences, refresh_every=c.refresh_every,
        seed=int(cfg.seed), log=log)
    path = export / COMPACT_HEAD_FILE
    report = {**report, "generator": str(export / generator_file), "path": str(path)}
    save_compact_head(head, path, report)
    log(f"compact head: relative error {report['relative_error_before']:.4f} -> {report['relative_error_after']:.4f}"
        f", {report['multiply_adds_per_token']:,} multiply-adds per token (full head "
        f"{report['full_multiply_adds_per_token']:,}), {report['seconds']:.0f} s -> {path}")
    return report
