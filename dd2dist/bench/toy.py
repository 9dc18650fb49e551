"""The exact one-step check (``jobs/benchmark.py toy``): DD2 on an enumerable teacher, scored by total variation
to its exact joint.

    python jobs/benchmark.py toy --family var --seed 0 --out runs/bench/toy_var.json

1. A tiny VAR or LlamaGen teacher (the real classes) with V codes in R^Ce and N tokens is fitted to a random,
   strongly correlated lookup-table AR distribution and frozen (:mod:`dd2dist.bench.toy_teacher`).
2. Its exact joint over all V^N sequences per class comes from teacher-forced log-probs under the distillation
   target sampling (CFG rule etc.) (:mod:`dd2dist.bench.toy_tv`).
3. The unchanged :class:`~dd2dist.train.Trainer` runs stage 1 (GTS) and stage 2 (FCS/CSD) on CPU within a time
   budget; stage 2 is advanced in chunks so the EMA generator's TV can be measured against training time.
4. Reported (JSON + a printed summary): ``tv_one_step`` (EMA generator, nearest-code samples), ``tv_marginal_product``
   (the product of the joint's per-position marginals: how far an uncorrelated model is), ``tv_stage1`` (the stage-1
   model used as a one-step generator), ``tv_stage1_multistep`` (the stage-1 model as an AR-diffusion sampler),
   ``tv_floor`` (as many exact teacher samples: the sampling noise), ``seconds`` per stage and the TV curve.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from dd2dist.bench.toy_teacher import ToyTeacherSpec, build_toy_teacher, teacher_arch
from dd2dist.bench.toy_tv import empirical, exact_joint, marginal_product, tv, tv_floor, tv_per_position
from dd2dist.conditions import Cond, class_major_labels
from dd2dist.eval.sampling import ar_diffusion_ids

# Measured on this CPU: the VAR generator reached TV 0.40 in 100 generator steps at width 64 but plateaued near 0.5
# for 1000+ steps at width 32 (it must re-derive scale 1 from noise through the phi convs); LlamaGen did well at 32.
FAMILY_WIDTH = {"var": 64, "llamagen": 32}
FAMILY_HEADS = {"var": 4, "llamagen": 2}
STAGE2_CHUNK_GENERATOR_STEPS = 10  # generator steps per fit() call between budget checks


# ---------------------------------------------------------------------------------------------------------
# sampling the student and scoring it
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def one_step_ids(net, labels: Tensor, gen: torch.Generator, batch: int = 32768) -> Tensor:
    """Nearest-code ids (M, N) of one-step samples q = G(eps, y) of a StudentNet, in batches."""
    out = []
    for s in range(0, labels.shape[0], batch):
        lab = labels[s : s + batch]
        eps = torch.randn((lab.shape[0], net.num_tokens, net.embed_dim), generator=gen)
        q = net.generate(eps, Cond(labels=lab)).float()
        out.append(net.backbone.quantize(q))
    return torch.cat(out)


def tv_of_ids(ids: Tensor, labels: Tensor, joint: Tensor, vocab: int) -> float:
    return tv(empirical(ids, labels, vocab, joint.shape[0]), joint)


def ema_generator(trainer):
    """A frozen copy of the trainer's generator carrying its EMA weights."""
    net = copy.deepcopy(trainer.engines["generator"].module)
    net.load_state_dict(trainer.generator_state_dict(use_ema=True))
    return net.eval().requires_grad_(False)


def raw_generator(trainer):
    return copy.deepcopy(trainer.engines["generator"].module).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ToyRunOptions:
    """What the check measures and for how long."""

    budget_seconds: float = 600.0  # training wall time, stage 1 + stage 2 (evaluations excluded)
    max_generator_steps: int = 0  # also stop stage 2 after this many generator steps (0 = time budget only)
    eval_every_seconds: float = 60.0  # stage-2 training time between TV-curve points
    curve_samples_per_class: int = 50_000  # samples per class for a curve point
    final_samples: int = 1_000_000  # one-step samples for the final figures (split evenly over classes)
    multistep_samples: int = 20_000  # AR-diffusion samples of the stage-1 model (0 = skip)
    euler_steps: int = 32
    threads: int = 0  # torch intra-op threads; 0 = leave as is


@dataclass
class ToyResult:
    """Everything :func:`run_toy` measured (written as JSON)."""

    tv_one_step: float
    tv_marginal_product: float
    tv_stage1: float
    tv_floor: float
    seconds: dict[str, float]
    tv_one_step_raw: float = math.nan
    tv_stage1_multistep: float = math.nan
    tv_floor_multistep: float = math.nan
    curve: list[dict[str, float]] = field(default_factory=list)
    tv_per_position: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)

    def summary(self) -> str:
        s = self.seconds
        lines = [
            f"toy {self.teacher.get('family')} V={self.teacher.get('vocab')} N={self.teacher.get('num_tokens')} "
            f"seed={self.teacher.get('seed')}:",
            f"  tv_one_step          {self.tv_one_step:.4f}   (raw generator {self.tv_one_step_raw:.4f})",
            f"  tv_marginal_product  {self.tv_marginal_product:.4f}",
            f"  tv_stage1            {self.tv_stage1:.4f}   (multistep {self.tv_stage1_multistep:.4f}, "
            f"floor {self.tv_floor_multistep:.4f})",
            f"  tv_floor             {self.tv_floor:.4f}   ({self.samples.get('final')} samples)",
            f"  ratios               one_step/marginal {self.tv_one_step / self.tv_marginal_product:.3f}, "
            f"one_step/stage1 {self.tv_one_step / max(self.tv_stage1, 1e-12):.3f}",
            "  seconds              " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()),
            "  curve (stage-2 s: tv) " + ", ".join(f"{p['seconds']:.0f}: {p['tv']:.3f}" for p in self.curve),
        ]
        return "\n".join(lines)


def toy_config(base_cfg, spec: ToyTeacherSpec, seed: int):
    """The experiment config for the toy: the YAML's training settings, the toy teacher's architecture, the
    given seed, and a stage 2 long enough never to end before the time budget does."""
    family, var, lg = teacher_arch(spec)
    teacher_cfg = replace(base_cfg.teacher, family=family, official=None, checkpoint=None, tokenizer_checkpoint=None,
                          **({"var": var} if family == "var" else {"llamagen": lg}))
    stage2 = replace(base_cfg.stage2, generator_steps=max(base_cfg.stage2.generator_steps, 1_000_000))
    tracking = replace(base_cfg.tracking, enabled=False, progress_every_s=0.0,
                       log_every=max(base_cfg.tracking.log_every, 10**9))
    return replace(base_cfg, seed=seed, teacher=teacher_cfg, stage2=stage2, tracking=tracking,
                   stages=("stage1", "stage2"))


def run_toy(spec: ToyTeacherSpec, cfg, opts: ToyRunOptions, log=print) -> ToyResult:
    """Build the teacher, compute its exact joint, train stage 1 + stage 2 within the budget, measure the TVs."""
    from dd2dist.engine.factory import TorchEngineFactory
    from dd2dist.train import Trainer

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    teacher, fit = build_toy_teacher(spec)
    seconds["teacher_fit"] = fit.seconds
    log(f"teacher fitted in {fit.seconds:.1f}s: cross-entropy {fit.cross_entropy:.4f} vs table entropy "
        f"{fit.table_entropy:.4f} nats/sequence")

    t0 = time.perf_counter()
    sampling = cfg.teacher.sampling
    C, V, N = spec.num_classes, spec.vocab, spec.num_tokens
    joint = exact_joint(teacher, sampling, C)
    product = marginal_product(joint, V, N)
    per_class = max(1, opts.final_samples // C)
    result_floor = tv_floor(joint, per_class, seed=spec.seed + 1)
    curve_floor = tv_floor(joint, opts.curve_samples_per_class, seed=spec.seed + 2)
    tv_mp = tv(product, joint)
    seconds["joint"] = time.perf_counter() - t0
    entropy = float(-(joint * joint.clamp_min(1e-30).log()).sum(1).mean())
    log(f"exact joint: entropy {entropy:.3f} nats, tv_marginal_product {tv_mp:.4f}, tv_floor {result_floor:.4f} "
        f"({per_class * C} samples), curve floor {curve_floor:.4f}")

    trainer = Trainer(cfg, teacher, TorchEngineFactory())
    stage1_iters = sum(p.iterations for p in trainer.schedule.phases if p.stage == "stage1")
    t0 = time.perf_counter()
    trainer.fit(max_iterations=stage1_iters)
    seconds["stage1"] = time.perf_counter() - t0
    stage1_net = copy.deepcopy(trainer.engines["student"].module).eval().requires_grad_(False)
    log(f"stage 1: {stage1_iters} iterations in {seconds['stage1']:.1f}s")

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(spec.seed + 3)
    labels = class_major_labels(C, per_class)
    tv_stage1 = tv_of_ids(one_step_ids(stage1_net, labels, gen), labels, joint, V)
    tv_ms = floor_ms = math.nan
    if opts.multistep_samples > 0:
        ms_per_class = max(1, opts.multistep_samples // C)
        ms_labels = class_major_labels(C, ms_per_class)
        tv_ms = tv_of_ids(ar_diffusion_ids(stage1_net, teacher, ms_labels, gen, opts.euler_steps), ms_labels,
                          joint, V)
        floor_ms = tv_floor(joint, ms_per_class, seed=spec.seed + 4)
    seconds["eval_stage1"] = time.perf_counter() - t0
    log(f"stage-1 model: one-step tv {tv_stage1:.4f}, AR-diffusion ({opts.euler_steps} Euler steps/token) tv "
        f"{tv_ms:.4f} (floor {floor_ms:.4f})")

    K = cfg.stage2.guidance_per_generator
    chunk = STAGE2_CHUNK_GENERATOR_STEPS * (K + 1)
    stage2_budget = max(0.0, opts.budget_seconds - seconds["stage1"])
    curve: list[dict[str, float]] = []
    train_s, eval_s, next_eval = 0.0, 0.0, opts.eval_every_seconds
    curve_labels = class_major_labels(C, opts.curve_samples_per_class)

    def more() -> bool:
        if opts.max_generator_steps and trainer.engines["generator"].optimizer_steps >= opts.max_generator_steps:
            return False
        return train_s < stage2_budget and not trainer.done

    t0 = time.perf_counter()
    trainer.fit(max_iterations=stage1_iters + 1)  # builds the stage-2 engines (one guidance step)
    train_s += time.perf_counter() - t0
    while more():
        t0 = time.perf_counter()
        trainer.fit(max_iterations=trainer.state.iteration + chunk)
        train_s += time.perf_counter() - t0
        if train_s >= next_eval or not more():
            t0 = time.perf_counter()
            cgen = torch.Generator().manual_seed(spec.seed + 5)
            point_tv = tv_of_ids(one_step_ids(ema_generator(trainer), curve_labels, cgen), curve_labels, joint, V)
            steps = trainer.engines["generator"].optimizer_steps
            curve.append({"seconds": round(train_s, 2), "generator_steps": steps, "tv": point_tv})
            eval_s += time.perf_counter() - t0
            next_eval = train_s + opts.eval_every_seconds
            log(f"stage 2: {train_s:6.1f}s, {steps} generator steps, EMA one-step tv {point_tv:.4f}")
    seconds["stage2"] = train_s
    seconds["eval_curve"] = eval_s

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(spec.seed + 6)
    final_net = ema_generator(trainer)
    ids = one_step_ids(final_net, labels, gen)
    tv_one = tv_of_ids(ids, labels, joint, V)
    sample_dist = empirical(ids, labels, V, C)
    raw_labels = curve_labels
    tv_raw = tv_of_ids(one_step_ids(raw_generator(trainer), raw_labels, gen), raw_labels, joint, V)
    seconds["eval_final"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    gen_steps = trainer.engines["generator"].optimizer_steps
    return ToyResult(
        tv_one_step=tv_one,
        tv_marginal_product=tv_mp,
        tv_stage1=tv_stage1,
        tv_floor=result_floor,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        tv_one_step_raw=tv_raw,
        tv_stage1_multistep=tv_ms,
        tv_floor_multistep=floor_ms,
        curve=curve,
        tv_per_position={"one_step": tv_per_position(sample_dist, joint, V, N),
                         "marginal_product": tv_per_position(product, joint, V, N)},
        samples={"final": per_class * C, "curve": opts.curve_samples_per_class * C,
                 "multistep": (opts.multistep_samples // C) * C, "raw_generator": opts.curve_samples_per_class * C},
        teacher={**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
                 "num_tokens": N, "fit": asdict(fit), "joint_entropy": entropy, "sampling": asdict(sampling),
                 "curve_floor": curve_floor},
        training={"generator_steps": gen_steps, "stage1_iterations": stage1_iters,
                  "iterations": trainer.state.iteration,
                  "skipped": dict(trainer.state.skipped), "stage1": asdict(cfg.stage1), "stage2": asdict(cfg.stage2),
                  "student": asdict(cfg.student), "budget_seconds": opts.budget_seconds},
        machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                 "torch": torch.__version__, "load_avg_end": list(os.getloadavg())},
    )


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------
