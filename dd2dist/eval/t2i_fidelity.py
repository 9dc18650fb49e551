"""Text-to-image fidelity: a text-conditional run's samplers scored against the teacher's own samples, per prompt.

The same idea as :mod:`dd2dist.eval.fidelity`, with prompts in place of class labels. Every sampler draws one image
per prompt of a fixed prompt set (captions with what is true of the image they ask for: a class and properties;
some phrased as in training, some with phrasings held out of the teacher's training):

* ``reference``: teacher draw A, what every sampler is scored against;
* ``teacher``: an independent teacher draw B, the **floor** of each score at this sample count;
* ``marginals``: every token drawn independently from the teacher's per-position marginals given the caption's
  class (counted on a third teacher draw C): the trivial baseline with no dependence between tokens, which still
  follows the caption's class;
* ``one_step`` / ``one_step_snapped``: the DD2 generator (continuous tokens decoded as they are / nearest codes);
  ``dd1`` / ``dd1_snapped`` (the generator after the PF-ODE regression alone) and ``stage1`` where the run has them.

Scores per sampler: FID / precision / recall in the digits-classifier feature space against draw A
(``fid_to_teacher``), **prompt adherence** on the seen and on the held-out phrasings (the classifier's accuracy on
the caption's class, agreement of each measured property with the caption; a callable the caller supplies), and
the token statistics by caption class (per-position marginal TV, pairwise joint TV). Dependence captured =
(S_marginals - S) / (S_marginals - S_floor) as in the class-conditional benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dd2dist.conditions import Cond
from dd2dist.eval.fidelity import (
    FeatureScorer,
    PointSet,
    decode,
    dependence_captured,
    feature_scores,
    load_run_nets,
    marginal_product_draw,
    run_config,
)
from dd2dist.eval.token_marginals import class_position_counts, marginal_tv
from dd2dist.eval.token_pairs import pair_counts, pair_tv
from dd2dist.teachers.base import ARTeacher

DRAW_OFFSETS = {"reference": 110_000_000, "teacher": 210_000_000, "marginal_counts": 310_000_000,
                "marginals": 410_000_000, "one_step": 510_000_000, "stage1": 610_000_000, "dd1": 710_000_000}
SAMPLERS = ("teacher", "marginals", "one_step", "one_step_snapped", "stage1", "dd1", "dd1_snapped")
# adherence(uint8 images (M, 3, H, W), the prompts' records) -> {"class_accuracy": .., "property_agreement": .., ...}
Adherence = Callable[[Tensor, list[dict]], dict]


@dataclass(frozen=True)
class Prompts:
    """The prompt set: its condition rows, each prompt's class, whether its phrasing was held out, its record."""

    cond: Cond  # (M, T, Dt) text features + (M, T) mask
    classes: Tensor  # (M,) int64
    heldout: Tensor  # (M,) bool
    records: list[dict]

    def __post_init__(self) -> None:
        M = self.cond.batch_size
        if self.classes.shape != (M,) or self.heldout.shape != (M,) or len(self.records) != M:
            raise ValueError(f"Prompts: {M} conditions but classes {tuple(self.classes.shape)}, heldout "
                             f"{tuple(self.heldout.shape)}, {len(self.records)} records")


@torch.no_grad()
def teacher_draw(teacher: ARTeacher, prompts: Prompts, sampling, seed_base: int, batch: int) -> Tensor:
    """Teacher ids (M, N), one per prompt; the batch starting at prompt i draws from a generator seeded
    ``seed_base + i``."""
    out = []
    for start in range(0, prompts.classes.shape[0], batch):
        gen = torch.Generator().manual_seed(seed_base + start)
        cond = prompts.cond.select(slice(start, start + batch))
        out.append(teacher.sample(cond, sampling, generator=gen).clone())
    return torch.cat(out)


@torch.no_grad()
def one_step_draw(net, prompts: Prompts, seed_base: int, batch: int) -> Tensor:
    """Continuous one-step tokens (M, N, Ce), one per prompt, noise seeded like :func:`teacher_draw`."""
    out = []
    for start in range(0, prompts.classes.shape[0], batch):
        cond = prompts.cond.select(slice(start, start + batch))
        gen = torch.Generator().manual_seed(seed_base + start)
        eps = torch.randn((cond.batch_size, net.num_tokens, net.embed_dim), generator=gen)
        out.append(net.generate(eps, cond).float())
    return torch.cat(out)


def _split_adherence(adherence: Adherence, images: Tensor, prompts: Prompts) -> dict[str, float]:
    """Adherence on the seen and on the held-out phrasings, each figure suffixed ``_seen`` / ``_heldout``."""
    out: dict[str, float] = {}
    for suffix, rows in (("seen", ~prompts.heldout), ("heldout", prompts.heldout)):
        idx = torch.nonzero(rows).flatten()
        if idx.numel() == 0:
            continue
        scores = adherence(images[idx], [prompts.records[i] for i in idx.tolist()])
        out.update({f"{k}_{suffix}": float(v) for k, v in scores.items() if isinstance(v, (int, float))})
    return out


def t2i_fidelity(run_dir: str | Path, prompts: Prompts, adherence: Adherence, batch_size: int = 500,
                 samplers: tuple[str, ...] = SAMPLERS, log: Callable[[str], None] = print) -> dict:
    """Score every sampler of the text-conditional run in ``run_dir`` on ``prompts``; returns the report."""
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.features import digits_feature_space
    from dd2dist.teachers import build_seeded_teacher

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    if not getattr(teacher, "is_text", False):
        raise ValueError(f"{run_dir}: the run's teacher is not text-conditional; use dd2dist.eval.fidelity")
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown text-to-image sampler(s) {unknown}; choose from {', '.join(SAMPLERS)}")
    sampling, batch, V = cfg.teacher.sampling, int(batch_size), int(teacher.vocab_size)
    classes = prompts.classes.long()
    C = int(classes.max()) + 1
    M = classes.shape[0]
    base = int(cfg.seed) * 1_000_003
    nets = load_run_nets(cfg, teacher, run_dir, samplers)
    _, _, clf_path = cached_classifier()
    scorer = FeatureScorer(digits_feature_space(clf_path), batch)
    seconds: dict[str, float] = {}

    def timed(name: str, make: Callable[[], Tensor]) -> Tensor:
        t0 = time.perf_counter()
        out = make()
        seconds[name] = time.perf_counter() - t0
        log(f"  drew {name}: {M} samples in {seconds[name]:.1f} s")
        return out

    ref_ids = timed("reference", lambda: teacher_draw(teacher, prompts, sampling, base + DRAW_OFFSETS["reference"],
                                                      batch))
    tokens: dict[str, tuple[Tensor, str]] = {}  # name -> (ids or continuous tokens, how they are decoded)
    if "teacher" in samplers:
        tokens["teacher"] = (timed("teacher", lambda: teacher_draw(teacher, prompts, sampling,
                                                                   base + DRAW_OFFSETS["teacher"], batch)), "ids")
    if "marginals" in samplers:
        counted = timed("marginal_counts", lambda: teacher_draw(teacher, prompts, sampling,
                                                                base + DRAW_OFFSETS["marginal_counts"], batch))
        counts = class_position_counts(counted, classes, C, V)
        tokens["marginals"] = (marginal_product_draw(counts, classes, base + DRAW_OFFSETS["marginals"]), "ids")
    for key in ("one_step", "stage1", "dd1"):
        if key in nets and (key in samplers or f"{key}_snapped" in samplers):
            cont = timed(key, lambda net=nets[key], key=key: one_step_draw(net, prompts, base + DRAW_OFFSETS[key],
                                                                           batch))
            if key in samplers:
                tokens[key] = (cont, "continuous")
            if f"{key}_snapped" in samplers:
                tokens[f"{key}_snapped"] = (cont, "snapped")

    t0 = time.perf_counter()
    ref_images = decode(teacher, ref_ids, batch)
    ref_points = PointSet(scorer.features(ref_images)[0])
    ref_marg = class_position_counts(ref_ids, classes, C, V)
    ref_pairs = pair_counts(ref_ids, classes, C, V)
    results: dict[str, dict] = {}
    results["reference"] = {"what": "teacher draw A (the reference every sampler is scored against)",
                            **_split_adherence(adherence, ref_images, prompts)}
    for name, (toks, kind) in tokens.items():
        ids = teacher.quantize(toks).long() if toks.is_floating_point() else toks.long()
        images = decode(teacher, toks if kind == "continuous" else ids, batch)
        feats, _ = scorer.features(images)
        res: dict[str, Any] = feature_scores(feats, ref_points)
        res.update(_split_adherence(adherence, images, prompts))
        res["token_marginal_tv"] = marginal_tv(class_position_counts(ids, classes, C, V), ref_marg)["mean"]
        res["pair_tv"] = pair_tv(pair_counts(ids, classes, C, V), ref_pairs)["mean"]
        res["tokens"] = {"ids": "codes", "snapped": "nearest codes of the continuous output",
                         "continuous": "continuous output, decoded as is"}[kind]
        results[name] = res
    seconds["scoring"] = time.perf_counter() - t0
    if "teacher" in results and "marginals" in results:
        floor, marg = results["teacher"], results["marginals"]
        for name, res in results.items():
            if name == "reference":
                continue
            res["dependence_captured"] = dependence_captured(res["fid_to_teacher"], marg["fid_to_teacher"],
                                                             floor["fid_to_teacher"])
            res["dependence_captured_pair_tv"] = dependence_captured(res["pair_tv"], marg["pair_tv"],
                                                                     floor["pair_tv"])
    seconds["total"] = time.perf_counter() - t_start
    return {
        "family": teacher.family, "run_dir": str(run_dir), "num_prompts": M,
        "num_heldout_prompts": int(prompts.heldout.sum()), "teacher_sampling": asdict(sampling),
        "floor_fid": results.get("teacher", {}).get("fid_to_teacher"),
        "feature_space": f"digits classifier {clf_path}", "samplers": results,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
