"""Teacher-referenced fidelity: how close each sampler of a run comes to the teacher's own distribution.

A distillation method is judged by generator-vs-teacher, not by generator-vs-data: FID against a few held-out
images mixes the teacher's own error with the student's. The teacher can be sampled without limit, so every
sampler here is scored against an independent set of the teacher's samples (draw A):

* ``teacher``: a second, independent teacher draw (B). Its scores are the **floor**: the value of each metric
  for a perfect distillation at this sample count;
* ``marginals``: every token drawn independently from the teacher's class-conditional per-position marginals,
  counted on a third teacher draw (C). A sampler at this score has learned no dependence between tokens;
* ``one_step`` (continuous tokens decoded as they are), ``one_step_snapped`` (their nearest codes),
  ``one_step_compact`` (the compact sampling head), ``refined_k`` (the one-step sample with its last k-1 AR steps
  re-sampled by the teacher), ``stage1`` (the stage-1 model used as a one-step generator), ``stage1_ar`` (the
  stage-1 model as an AR-diffusion sampler, :func:`~dd2dist.eval.sampling.ar_diffusion_ids`: how much of the
  teacher the guidance network starts from), ``dd1`` /
  ``dd1_snapped`` (the generator after the PF-ODE regression alone, before any CSD step: Distilled Decoding 1's
  noise-to-token map), each where the run has its weights.

Scores per sampler, in the feature space of :mod:`dd2dist.eval.features` (the digits classifier for the digits
teachers): FID, precision and recall against draw A (torch-fidelity's formulas on features computed once per
set), class consistency (class-conditional teachers) and the mix of digits drawn against draw A's
(``class_mix_tv``: for an unconditional teacher the tokens of a sample must agree on one digit among themselves);
and on the tokens (nearest codes of continuous samples) three figures that need no feature network: per-position
marginal TV (:mod:`dd2dist.eval.token_marginals`), pairwise joint TV (:mod:`dd2dist.eval.token_pairs`) and the
teacher's exact mean negative log-likelihood of the sequences under the distillation target.

The headline, per sampler: **dependence captured** = (S_marginals - S) / (S_marginals - S_floor) for S = FID to
the teacher (and the same for the pairwise TV): 0 for a sampler no better than independent tokens, 1 at the floor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dd2dist.conditions import Cond, cyclic_labels
from dd2dist.eval.token_marginals import class_position_counts, marginal_tv
from dd2dist.eval.token_pairs import pair_counts, pair_tv
from dd2dist.teachers.base import ARTeacher

REGRESSION_EXPORT = "generator_regression.safetensors"  # the generator as the PF-ODE regression left it
# Seed offsets of the independent draws, far from evaluate_run's per-run range (seed * 1_000_003 + 7919 + i)
DRAW_OFFSETS = {"reference": 100_000_000, "teacher": 200_000_000, "marginal_counts": 300_000_000,
                "marginals": 400_000_000, "one_step": 500_000_000, "stage1": 600_000_000, "dd1": 700_000_000,
                "stage1_ar": 800_000_000, "extra": 900_000_000}
ALL_SAMPLERS = ("teacher", "marginals", "one_step", "one_step_snapped", "one_step_compact", "refined", "stage1",
                "stage1_ar", "dd1", "dd1_snapped")
# what the demo and the benchmark score unless asked: stage1_ar takes 16 x 32 head calls per sample (111 s for 10,000
# digits LlamaGen samples on 2 cores, 20x the one-step draw), a diagnostic to ask for by name
DEFAULT_SAMPLERS = tuple(s for s in ALL_SAMPLERS if s != "stage1_ar")
AR_DIFFUSION_EULER_STEPS = 32  # per token, for ``stage1_ar``


@dataclass
class FidelityOptions:
    """What the benchmark draws: ``num_samples`` per set (class-balanced), which samplers."""

    num_samples: int = 10_000
    batch_size: int = 500
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS  # those whose weights the run lacks are left out
    refine_steps: tuple[int, ...] | None = None  # None: the run's eval.refine_steps
    prc_neighborhood: int = 3
    nll_samples: int = 1_000  # sequences per set whose teacher NLL is computed (s.e. 0.3-1.3 nats on the digits)
    grid_dir: str | None = None  # save a PNG grid of each set's first 100 images here (rows: classes 0-9 in turn)


@dataclass
class Draw:
    """One sampler's set: nearest-code ids (M, N), decoded uint8 images, generation time."""

    ids: Tensor
    images: Tensor
    seconds: float
    settings: dict = field(default_factory=dict)


def dependence_captured(score: float, marginals: float, floor: float) -> float:
    """(S_marginals - S) / (S_marginals - S_floor): 0 = no better than independent tokens, 1 = at the floor."""
    span = marginals - floor
    return (marginals - score) / span if span > 0 else math.nan


# ---------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------


def _uint8(x: Tensor) -> Tensor:
    from dd2dist.data.digits import to_uint8

    return to_uint8(x)


@torch.no_grad()
def teacher_draw(teacher: ARTeacher, labels: Tensor, sampling, seed_base: int, batch: int) -> Tensor:
    """Teacher token ids (M, N); batch starting at i is drawn from a generator seeded ``seed_base + i``."""
    out = []
    for start in range(0, labels.shape[0], batch):
        gen = torch.Generator().manual_seed(seed_base + start)
        out.append(teacher.sample(Cond(labels=labels[start : start + batch]), sampling, generator=gen).clone())
    return torch.cat(out)


def marginal_product_draw(counts: Tensor, labels: Tensor, seed: int) -> Tensor:
    """Ids (M, N), each token drawn independently from the class-conditional marginals ``counts`` (C, N, V)."""
    probs = counts.double() + 1e-9  # classes never seen would otherwise have no distribution
    probs = (probs / probs.sum(-1, keepdim=True))[labels]  # (M, N, V)
    M, N, V = probs.shape
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs.reshape(M * N, V).float(), 1, generator=gen).view(M, N)


@torch.no_grad()
def one_step_draw(net, labels: Tensor, seed_base: int, batch: int) -> Tensor:
    """Continuous one-step tokens (M, N, Ce) of a generator (a StudentNet or its sampling form); batch starting
    at i draws its noise from a generator seeded ``seed_base + i``."""
    out = []
    for start in range(0, labels.shape[0], batch):
        lab = labels[start : start + batch]
        gen = torch.Generator().manual_seed(seed_base + start)
        eps = torch.randn((lab.shape[0], net.num_tokens, net.embed_dim), generator=gen)
        out.append(net.generate(eps, Cond(labels=lab)).float())
    return torch.cat(out)


def stage1_ar_draw(net, teacher: ARTeacher, labels: Tensor, seed_base: int, batch: int) -> Tensor:
    """Ids (M, N) of the stage-1 model's AR-diffusion sampler; batch starting at i draws from seed_base + i."""
    from dd2dist.eval.sampling import ar_diffusion_ids

    return torch.cat([ar_diffusion_ids(net, teacher, labels[s : s + batch],
                                       torch.Generator().manual_seed(seed_base + s),
                                       AR_DIFFUSION_EULER_STEPS, batch)
                      for s in range(0, labels.shape[0], batch)])


@torch.no_grad()
def refined_draw(net, teacher: ARTeacher, labels: Tensor, k: int, sampling, seed_base: int, batch: int) -> Tensor:
    """Ids (M, N) of one-step samples whose last k-1 AR steps the teacher re-sampled."""
    from dd2dist.eval.sampling import teacher_refined

    out = []
    for start in range(0, labels.shape[0], batch):
        gen = torch.Generator().manual_seed(seed_base + start)
        _, ids = teacher_refined(net, teacher, Cond(labels=labels[start : start + batch]), k, sampling, gen)
        out.append(ids)
    return torch.cat(out)


@torch.no_grad()
def decode(teacher: ARTeacher, tokens: Tensor, batch: int) -> Tensor:
    """uint8 images of ids (M, N) or continuous tokens (M, N, Ce)."""
    return torch.cat([_uint8(teacher.decode(tokens[s : s + batch])) for s in range(0, tokens.shape[0], batch)])


# ---------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------


PRC_BATCH = 10_000  # rows per distance block, torch-fidelity's default


class PointSet:
    """A feature set (M, D) with what FID and precision / recall read of it, computed once: its mean and covariance
    (fp64) and the radius of each point's k-th nearest neighbour. The benchmark scores ~10 sets against one
    reference, and each set against two references (the teacher and the held-out data): computing the reference's
    radii once, and each set's once, halves the distance work of torch-fidelity's per-pair function."""

    def __init__(self, feats: Tensor, neighborhood: int = 3):
        from torch_fidelity.metric_fid import fid_features_to_statistics
        from torch_fidelity.metric_prc import calc_cdist_part

        self.feats = feats.float()
        self.neighborhood = int(neighborhood)
        self.stats = fid_features_to_statistics(feats.double())
        self.radii = torch.cat([calc_cdist_part(rows, self.feats, PRC_BATCH).kthvalue(self.neighborhood + 1).values
                                for rows in self.feats.split(PRC_BATCH)])

    def covers(self, feats: Tensor) -> float:
        """The fraction of the rows of ``feats`` inside at least one of this set's k-NN balls."""
        from torch_fidelity.metric_prc import calc_cdist_part

        inside = [(calc_cdist_part(rows, self.feats, PRC_BATCH) <= self.radii).any(dim=1).float()
                  for rows in feats.float().split(PRC_BATCH)]
        return torch.cat(inside).mean().item()


def feature_scores(feats: Tensor | PointSet, reference: Tensor | PointSet,
                   prc_neighborhood: int = 3) -> dict[str, float]:
    """FID, precision and recall of features ``feats`` (M, D) (generated) against ``reference`` (M', D), with
    torch-fidelity's formulas (precision: generated points inside the reference's k-NN balls; recall: the
    reverse). Either side may be a :class:`PointSet` built once and reused."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    gen = feats if isinstance(feats, PointSet) else PointSet(feats, prc_neighborhood)
    ref = reference if isinstance(reference, PointSet) else PointSet(reference, prc_neighborhood)
    if gen.neighborhood != ref.neighborhood:
        raise ValueError(f"precision / recall neighbourhoods differ: {gen.neighborhood} and {ref.neighborhood}")
    fid = fid_statistics_to_metric(gen.stats, ref.stats, False)
    return {"fid_to_teacher": float(fid["frechet_inception_distance"]), "precision": ref.covers(gen.feats),
            "recall": gen.covers(ref.feats)}


class FeatureScorer:
    """Features of uint8 images in a :class:`~dd2dist.eval.features.FeatureSpace`, computed once per set: the layer
    FID and precision / recall read (the same one in every space this project has) and the IS logits."""

    def __init__(self, space, batch_size: int = 500):
        from torch_fidelity.utils import create_feature_extractor

        if space.fid_layer != space.prc_layer:
            raise ValueError(f"feature space {space.extractor}: FID reads {space.fid_layer!r} but precision / recall "
                             f"{space.prc_layer!r}; the fidelity benchmark scores both on one layer")
        self.batch_size = batch_size
        self.layers = (space.fid_layer, space.isc_layer)
        self.extractor = create_feature_extractor(
            space.extractor, list(self.layers), feature_extractor_weights_path=space.weights_path, cuda=False,
            verbose=False)

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """((M, D) fp64 features, (M, K) IS logits) of uint8 images (M, 3, H, W)."""
        feats, logits = [], []
        for s in range(0, images.shape[0], self.batch_size):
            f, lg = self.extractor(images[s : s + self.batch_size].contiguous())
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)


def inception_score(logits: Tensor) -> float:
    """torch-fidelity's Inception Score of IS logits (M, K), 10 splits (fewer for tiny sets)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    return float(isc_features_to_metric(logits, splits=max(1, min(10, logits.shape[0] // 2)))["inception_score_mean"])


@torch.no_grad()
def teacher_nll(teacher: ARTeacher, ids: Tensor, labels: Tensor, sampling, batch: int) -> dict:
    """The teacher's exact negative log-likelihood of token sequences under the distillation target ``sampling``,
    in nats per sequence (mean and its standard error), its mean per position (``per_position``: each token scored
    under the teacher's conditional given the sequence's own prefix) and the fraction of tokens the target gives no
    mass."""
    rows, zero = [], 0
    for s in range(0, ids.shape[0], batch):
        x = ids[s : s + batch]
        lp = teacher.log_probs(x, Cond(labels=labels[s : s + batch]), sampling).gather(-1, x[..., None])[..., 0]
        finite = torch.isfinite(lp)
        zero += int((~finite).sum())
        rows.append(-lp.double().where(finite, torch.zeros_like(lp, dtype=torch.float64)))
    per_token = torch.cat(rows)  # (M, N)
    nll = per_token.sum(-1)
    return {"mean": float(nll.mean()), "se": float(nll.std() / math.sqrt(max(1, nll.numel()))),
            "per_position": [float(v) for v in per_token.mean(0)],
            "zero_probability_tokens": zero / max(1, ids.numel())}


# ---------------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------------


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()):
    """The resolved config a run was trained with (``<run>/config.yaml``, else ``<run>/export/config.yaml``), with
    ``KEY=VALUE`` ``overrides`` applied."""
    from dd2dist.config import load_config

    run_dir = Path(run_dir)
    for path in (run_dir / "config.yaml", run_dir / "export" / "config.yaml"):
        if path.is_file():
            return load_config(path, list(overrides), check_paths=False)
    raise FileNotFoundError(f"{run_dir}: no config.yaml (the resolved config jobs/distill.py writes) in the run or "
                            "its export/ folder")


def load_run_nets(cfg, teacher: ARTeacher, run_dir: Path, wanted: tuple[str, ...]) -> dict[str, Any]:
    """The sampling forms of the generators the run has: one_step (+ compact), stage1, dd1; and the stage-1 model
    itself for its AR-diffusion sampler (stage1_ar)."""
    from dd2dist.eval.run_eval import find_stage1_weights, load_student_weights
    from dd2dist.eval.sampling import load_generator
    from dd2dist.nets.compact_head import COMPACT_HEAD_FILE, load_compact_head
    from dd2dist.nets.student import StudentNet

    export = run_dir / "export"
    nets: dict[str, Any] = {}
    if (export / "generator.safetensors").is_file():
        net, _ = load_generator(export)
        nets["one_step"] = net.for_sampling()
        if "one_step_compact" in wanted and (export / COMPACT_HEAD_FILE).is_file():
            nets["one_step_compact"] = net.for_sampling(load_compact_head(export / COMPACT_HEAD_FILE).folded())
    if "dd1" in wanted or "dd1_snapped" in wanted:
        if (export / REGRESSION_EXPORT).is_file():
            nets["dd1"] = load_generator(export, weights_file=REGRESSION_EXPORT)[0].for_sampling()
    if "stage1" in wanted or "stage1_ar" in wanted:
        path = find_stage1_weights(run_dir)
        if path is not None:
            net = StudentNet(teacher, cfg.student, init_adapter=False)
            net.load_state_dict(load_student_weights(path))
            net = net.eval().requires_grad_(False)
            if "stage1" in wanted:
                nets["stage1"] = net.for_sampling()
            if "stage1_ar" in wanted:
                nets["stage1_ar"] = net
    return nets


def fidelity_benchmark(run_dir: str | Path, opts: FidelityOptions = FidelityOptions(), space_kind: str = "auto",
                       log: Callable[[str], None] = print, extra_nets: dict[str, Any] | None = None) -> dict:
    """Score every sampler of the run in ``run_dir`` against the teacher's own samples; returns the report.

    ``extra_nets``: more one-step samplers to score under their own names, each with the sampling form's
    ``generate(eps, cond)`` and ``num_tokens`` / ``embed_dim`` (e.g. a diagnostic generator trained outside the run),
    on noise of their own seeds; their outputs are snapped to codes."""
    from dd2dist.data.digits import NUM_CLASSES
    from dd2dist.eval.metrics import class_mix_tv, consistency_of_predictions, predicted_class_mix
    from dd2dist.eval.run_eval import teacher_feature_space
    from dd2dist.teachers import build_seeded_teacher

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    sampling = cfg.teacher.sampling
    C, V = int(teacher.num_classes), int(teacher.vocab_size)
    n, batch = int(opts.num_samples), int(opts.batch_size)
    if n < 2 * C:
        raise ValueError(f"num_samples must be at least 2 per class ({2 * C}), got {n}")
    labels = cyclic_labels(n, C)
    base = int(cfg.seed) * 1_000_003
    unknown = [s for s in opts.samplers if s not in ALL_SAMPLERS]
    if unknown:
        raise ValueError(f"unknown fidelity sampler(s) {unknown}; choose from {', '.join(ALL_SAMPLERS)}")
    nets = load_run_nets(cfg, teacher, run_dir, opts.samplers)
    refine = tuple(cfg.eval.refine_steps if opts.refine_steps is None else opts.refine_steps)
    space, heldout, classifier = teacher_feature_space(cfg, teacher, space_kind)
    scorer = FeatureScorer(space, batch)
    seconds: dict[str, float] = {}

    def timed(name: str, make: Callable[[], Tensor]) -> tuple[Tensor, float]:
        t0 = time.perf_counter()
        out = make()
        seconds[name] = time.perf_counter() - t0
        return out, seconds[name]

    # the reference (A), the floor's second teacher draw (B) and the draw the marginals are counted on (C)
    ref_ids, _ = timed("reference", lambda: teacher_draw(teacher, labels, sampling, base + DRAW_OFFSETS["reference"],
                                                         batch))
    # (name, seed base of its draws, make its tokens from that base, how they are decoded); a continuous sampler
    # and its snapped form share one draw
    plan: list[tuple[str, int, Callable[[int], Tensor], str]] = []
    if "teacher" in opts.samplers:
        plan.append(("teacher", base + DRAW_OFFSETS["teacher"],
                     lambda seed: teacher_draw(teacher, labels, sampling, seed, batch), "ids"))
    if "marginals" in opts.samplers:
        def marginals(seed: int) -> Tensor:
            counted = teacher_draw(teacher, labels, sampling, base + DRAW_OFFSETS["marginal_counts"], batch)
            return marginal_product_draw(class_position_counts(counted, labels, C, V), labels, seed)
        plan.append(("marginals", base + DRAW_OFFSETS["marginals"], marginals, "ids"))
    for key in ("one_step", "stage1", "dd1"):
        if key in nets:
            make = (lambda seed, net=nets[key]: one_step_draw(net, labels, seed, batch))
            plan += [(name, base + DRAW_OFFSETS[key], make, kind)
                     for name, kind in ((key, "continuous"), (f"{key}_snapped", "snapped")) if name in opts.samplers]
    if "stage1_ar" in nets:
        plan.append(("stage1_ar", base + DRAW_OFFSETS["stage1_ar"],
                     lambda seed: stage1_ar_draw(nets["stage1_ar"], teacher, labels, seed, batch), "ids"))
    for i, (name, net) in enumerate((extra_nets or {}).items()):
        plan.append((name, base + DRAW_OFFSETS["extra"] + i * 10_000_000,
                     lambda seed, net=net: one_step_draw(net, labels, seed, batch), "snapped"))
    if "one_step_compact" in nets:  # on one_step's noise: the two differ by the head alone
        plan.append(("one_step_compact", base + DRAW_OFFSETS["one_step"],
                     lambda seed: one_step_draw(nets["one_step_compact"], labels, seed, batch), "continuous"))
    if "refined" in opts.samplers and "one_step" in nets:
        for k in refine:
            plan.append((f"refined_{k}", base + DRAW_OFFSETS["one_step"],
                         lambda seed, k=k: refined_draw(nets["one_step"], teacher, labels, k, sampling, seed, batch),
                         "ids"))

    draws: dict[str, Draw] = {}
    drawn: dict[tuple, tuple[Tensor, float]] = {}  # (make, seed) -> tokens, seconds
    for name, seed, make, kind in plan:
        if (make, seed) not in drawn:
            drawn[(make, seed)] = timed(name, lambda make=make, seed=seed: make(seed))
        tokens, sec = drawn[(make, seed)]
        ids = teacher.quantize(tokens) if tokens.is_floating_point() else tokens
        images = decode(teacher, ids if kind in ("ids", "snapped") else tokens, batch)
        draws[name] = Draw(ids=ids.long(), images=images, seconds=sec, settings={
            "tokens": {"ids": "codes", "snapped": "nearest codes of the continuous output",
                       "continuous": "continuous output, decoded as is"}[kind],
            "seed_base": seed, "seeding": "the batch starting at sample i draws from seed_base + i"})
        log(f"  drew {name}: {n} samples in {sec:.1f} s")

    t0 = time.perf_counter()
    ref_images = decode(teacher, ref_ids, batch)
    ref_points = PointSet(scorer.features(ref_images)[0], opts.prc_neighborhood)
    # real held-out images (digits): the same sets also scored against data, the secondary column
    heldout_points = PointSet(scorer.features(heldout)[0], opts.prc_neighborhood) if torch.is_tensor(heldout) else None
    ref_mix = predicted_class_mix(classifier.predict(ref_images), NUM_CLASSES) if classifier is not None else None
    ref_marg = class_position_counts(ref_ids, labels, C, V)
    ref_pairs = pair_counts(ref_ids, labels, C, V)
    n_nll = min(n, int(opts.nll_samples))  # the first rows: labels cycle, so still class-balanced
    ref_nll = teacher_nll(teacher, ref_ids[:n_nll], labels[:n_nll], sampling, batch)
    def score(draw: Draw) -> dict:
        feats, logits = scorer.features(draw.images)
        points = PointSet(feats, opts.prc_neighborhood)
        res = feature_scores(points, ref_points)
        res["isc_mean"] = inception_score(logits)
        if heldout_points is not None:
            data = feature_scores(points, heldout_points)
            res.update({"fid_heldout": data["fid_to_teacher"], "precision_heldout": data["precision"],
                        "recall_heldout": data["recall"]})
        if classifier is not None:
            predicted = classifier.predict(draw.images).cpu()
            mix = predicted_class_mix(predicted, NUM_CLASSES)
            # which digits a sampler draws, against the teacher's own mix: without labels (C = 1) the tokens of a
            # sample must agree on their digit among themselves, and blends of digits show up here
            res["class_mix"], res["class_mix_tv"] = [round(float(f), 5) for f in mix], class_mix_tv(mix, ref_mix)
            if C == NUM_CLASSES:
                consistency = consistency_of_predictions(predicted, labels, C)
                res["class_consistency"] = consistency["class_consistency"]
                res["class_consistency_se"] = consistency["class_consistency_se"]
        res["token_marginal_tv"] = marginal_tv(class_position_counts(draw.ids, labels, C, V), ref_marg)["mean"]
        pairs = pair_tv(pair_counts(draw.ids, labels, C, V), ref_pairs)
        res["pair_tv"], res["pair_tv_by_distance"] = pairs["mean"], pairs["by_distance"]
        nll = teacher_nll(teacher, draw.ids[:n_nll], labels[:n_nll], sampling, batch)
        res["teacher_nll"], res["teacher_nll_se"] = nll["mean"], nll["se"]
        res["nll_gap"] = nll["mean"] - ref_nll["mean"]
        # where along the sequence the likelihood is lost: a generator whose tokens stop following their own prefix
        # shows it as a gap that grows with the position, while its per-position marginals may still look right
        res["nll_gap_by_position"] = [round(a - b, 4) for a, b in zip(nll["per_position"], ref_nll["per_position"])]
        res["zero_probability_tokens"] = nll["zero_probability_tokens"]
        return res

    results: dict[str, dict] = {}
    for name, draw in draws.items():
        # a categorical generator's continuous output is its codes' embeddings: its snapped set is the same set, and
        # scoring it again would only cost time (~6 s per 10,000 digits)
        same = next((other for other, d in draws.items() if other in results
                     and torch.equal(d.ids, draw.ids) and torch.equal(d.images, draw.images)), None)
        if same is None:
            res = score(draw)
        else:
            res = {key: value for key, value in results[same].items() if key != "grid"} | {"scores_of": same}
        if opts.grid_dir is not None:
            from dd2dist.eval.run_eval import save_grid

            res["grid"] = str(save_grid(draw.images, Path(opts.grid_dir) / f"grid_{name}.png"))
        res["generation_seconds"] = draw.seconds
        res["settings"] = draw.settings
        results[name] = res
    seconds["scoring"] = time.perf_counter() - t0

    if "teacher" in results and "marginals" in results:
        floor, marg = results["teacher"], results["marginals"]
        for res in results.values():
            res["dependence_captured"] = dependence_captured(res["fid_to_teacher"], marg["fid_to_teacher"],
                                                             floor["fid_to_teacher"])
            res["dependence_captured_pair_tv"] = dependence_captured(res["pair_tv"], marg["pair_tv"],
                                                                     floor["pair_tv"])
    headline = {}
    if "one_step" in results and "dependence_captured" in results["one_step"]:
        headline = {"dependence_captured": results["one_step"]["dependence_captured"],
                    "dependence_captured_pair_tv": results["one_step"]["dependence_captured_pair_tv"],
                    "floor_fid": results["teacher"]["fid_to_teacher"],
                    "marginals_fid": results["marginals"]["fid_to_teacher"],
                    "one_step_fid": results["one_step"]["fid_to_teacher"]}
        if "dd1" in results:
            headline["dd1_fid"] = results["dd1"]["fid_to_teacher"]
            headline["one_step_beats_dd1"] = results["one_step"]["fid_to_teacher"] < results["dd1"]["fid_to_teacher"]
    seconds["total"] = time.perf_counter() - t_start
    return {
        "family": teacher.family, "run_dir": str(run_dir), "num_samples": n, "per_class": n // C,
        "labels": "balanced (i mod num_classes)", "teacher_sampling": asdict(sampling),
        "reference": {"what": "independent teacher draw A", "seed_base": base + DRAW_OFFSETS["reference"],
                      "teacher_nll": ref_nll["mean"]},
        "nll_samples": n_nll, "feature_space": space.describe(), "headline": headline, "samplers": results,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def summary_lines(report: dict) -> list[str]:
    """A printed table: one row per sampler."""
    rows = [f"fidelity of {report['run_dir']} ({report['family']}, {report['num_samples']} samples per set, "
            f"against an independent teacher draw)",
            f"  {'sampler':<22} {'FID':>8} {'prec':>6} {'rec':>6} {'dep.':>6} {'pairTV':>7} {'dep.':>6} "
            f"{'margTV':>7} {'NLLgap':>7}"]
    for name, r in report["samplers"].items():
        rows.append(f"  {name:<22} {r['fid_to_teacher']:8.3f} {r['precision']:6.3f} {r['recall']:6.3f} "
                    f"{r.get('dependence_captured', math.nan):6.2f} {r['pair_tv']:7.4f} "
                    f"{r.get('dependence_captured_pair_tv', math.nan):6.2f} {r['token_marginal_tv']:7.4f} "
                    f"{r['nll_gap']:7.2f}")
    h = report.get("headline") or {}
    if h:
        rows.append(f"  dependence captured by DD2 one-step: {h['dependence_captured']:.2f} (FID), "
                    f"{h['dependence_captured_pair_tv']:.2f} (pairwise TV)"
                    + (f"; beats DD1-style regression: {h['one_step_beats_dd1']}" if "one_step_beats_dd1" in h else ""))
    rows.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return rows
