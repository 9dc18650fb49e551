"""Speed: the one-step generator vs the teacher's KV-cached AR sampler, on the same machine and batch.

    python jobs/benchmark.py speed --out runs/bench/speed.json             # digits teachers + VAR-d16 + LlamaGen-L
    python jobs/benchmark.py speed --models digits_var,digits_llamagen --batch-sizes 1,64 --out f.json

For each model and batch size, timed after warm-up runs (excluded), in the same process:

* ``teacher_ar``: the teacher's KV-cached sampler with its CFG (2B rows) -> ids; ``teacher_ar_decode`` adds the
  VQ decode;
* ``one_step``: the generator (a StudentNet: teacher backbone + MLP head) from noise -> continuous tokens in one
  forward pass; ``one_step_decode`` adds the VQ decode of those tokens;
* ``teacher_forced``: one teacher-forced pass of the teacher (features + head, batch B, no CFG) - the floor for a
  one-step generator built on the teacher backbone; ``decode``: the VQ decode alone. ``one_step`` and
  ``teacher_forced`` are timed interleaved (:func:`time_pair`) and their ratio is the median per-pair ratio;
* ``one_step_compact``: where the recipe fits a compact sampling head (``compact_head.enabled``), the same backbone
  with that head (:mod:`dd2dist.nets.compact_head`), timed interleaved with its own teacher-forced passes.

The generator's head is the demo recipe's for the digits (``--head-width`` / ``--head-depth`` override it), timed in
the form evaluation samples with (``StudentNet.for_sampling``: the head folded at t = 1; ``--head-form training``
times the StudentNet itself).
Weights are random (speed does not depend on them, as long as no op runs on fp32 subnormals: see the LlamaGen soft
input rule); the geometries are the real ones. Every number records
its repeats; nothing is extrapolated. JSON + a PNG bar chart (matplotlib) are written next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.config.schema import StudentConfig
from dd2dist.latent import guidance_weights
from dd2dist.nets.compact_head import CompactHead, CompactHeadSpec
from dd2dist.teachers.base import ARTeacher

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = ("digits_var", "digits_llamagen", "var_d16", "llamagen_l")
TRUE_SIZE = ("var_d16", "llamagen_l")
TIMINGS = ("teacher_ar", "teacher_ar_decode", "one_step", "one_step_decode", "teacher_forced", "decode")


def build_benchmark_teacher(model: str) -> tuple[ARTeacher, Sampling]:
    """A randomly initialised teacher of a named geometry and the sampling setting it is timed with.

    ``digits_var`` / ``digits_llamagen``: the architectures of ``configs/teachers/digits_*.yaml``; ``var_d16`` /
    ``llamagen_l``: the released geometries (docs/teachers.md), CFG on (VAR's ramp 2.0, LlamaGen constant 2.0).
    """
    from dd2dist.config import load_config
    from dd2dist.teachers import OFFICIAL_ARCHS, build_family

    if model in ("digits_var", "digits_llamagen"):
        cfg = load_config(REPO / "configs" / "teachers" / f"{model}.yaml", check_paths=False)
        family, arch, sampling = cfg.teacher.family, cfg.teacher.arch, cfg.teacher.sampling
    elif model in OFFICIAL_ARCHS:
        arch = OFFICIAL_ARCHS[model]
        family = "var" if model.startswith("var_") else "llamagen"
        sampling = Sampling(guidance_scale=2.0, guidance_schedule="var_linear" if family == "var" else "constant")
    else:
        raise ValueError(f"unknown benchmark model {model!r}; choose from digits_var, digits_llamagen, "
                         f"{', '.join(OFFICIAL_ARCHS)}")
    if getattr(arch, "caption_dim", 0):
        raise ValueError(f"{model}: text-to-image teachers are not benchmarked (class-conditional only)")
    with torch.random.fork_rng(devices=[]):  # reproducible weights without moving the caller's global RNG
        torch.manual_seed(0)
        teacher = build_family(family, **{family: arch}).freeze()
    # keep CFG, drop filtering: top-k/top-p cost is the same for both samplers' logits and not what we time
    return teacher, replace(sampling, top_k=0, top_p=1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> dict:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _summary(times, warmup)


def _summary(times: list[float], warmup: int, **extra: Any) -> dict:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times),
            "repeats": len(times), "warmup": warmup, **extra}


def time_pair(
    fn_a: Callable[[], Any], fn_b: Callable[[], Any], warmup: int, repeats: int, device: torch.device,
) -> tuple[dict, dict, float]:
    """Time two calls interleaved (a, b, a, b, ...): their timings and the median of the per-pair ratios a / b.

    A ratio of two separately timed medians moves by ±10% on a shared or virtualised CPU as the machine's speed
    drifts between the two series; adjacent pairs see the same machine, so their ratio is the stable figure.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    _sync(device)
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(times_a, times_b))
    return _summary(times_a, warmup, interleaved=True), _summary(times_b, warmup, interleaved=True), ratio


def generator_head(model: str) -> StudentConfig:
    """The generator head timed for ``model``: the demo recipe's head (configs/demo/<family>.yaml) for the digits,
    a paper-scale proposal (width 1024, depth 3) for the true-size geometries."""
    from dd2dist.config import load_config

    if model in ("digits_var", "digits_llamagen"):
        return load_config(REPO / "configs" / "demo" / f"{model.split('_', 1)[1]}.yaml", check_paths=False).student
    return StudentConfig(head_width=1024, head_depth=3, time_embed_dim=256)


def compact_head_spec(model: str) -> CompactHeadSpec | None:
    """The compact sampling head of the demo recipe for a digits model, when the recipe fits one."""
    from dd2dist.config import load_config

    if model not in ("digits_var", "digits_llamagen"):
        return None
    c = load_config(REPO / "configs" / "demo" / f"{model.split('_', 1)[1]}.yaml", check_paths=False).compact_head
    return CompactHeadSpec(c.width, c.depth, c.rank) if c.enabled else None


def _timed_calls(
    teacher: ARTeacher, generator: torch.nn.Module, sampling: Sampling, B: int, device: torch.device,
    dtype: torch.dtype, compact: torch.nn.Module | None = None,
) -> dict[str, Callable[[], Any]]:
    """The closures timed for one batch size (inputs built once, outside the timed region); ``compact``: the
    generator with its compact head, on the same noise."""
    cond = Cond(labels=torch.arange(B, device=device) % teacher.num_classes)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = teacher.sample(cond, sampling, generator=gen)
    eps = torch.randn(B, teacher.num_tokens, teacher.embed_dim, device=device, dtype=dtype, generator=gen)
    q = generator.generate(eps, cond)
    return {
        "teacher_ar": lambda: teacher.sample(cond, sampling, generator=gen),
        "teacher_ar_decode": lambda: teacher.decode(teacher.sample(cond, sampling, generator=gen)),
        "one_step": lambda: generator.generate(eps, cond),
        "one_step_decode": lambda: teacher.decode(generator.generate(eps, cond)),
        "teacher_forced": lambda: teacher.head_logits(teacher.features(ids, cond), cond),
        "decode": lambda: teacher.decode(q),
        **({"one_step_compact": lambda: compact.generate(eps, cond)} if compact is not None else {}),
    }


@torch.inference_mode()
def benchmark_model(
    model: str, batch_sizes: list[int], warmup: int, repeats: int, device: torch.device, dtype: torch.dtype,
    log: Callable[[str], None] = print, head_width: int = 0, head_depth: int = 0, head_form: str = "sampling",
    student_cfg: StudentConfig | None = None, compact_spec: CompactHeadSpec | None = None,
) -> list[dict]:
    """All timings of one model at each batch size (see the module docstring). ``student_cfg`` / ``compact_spec``
    replace the demo recipe's generator and compact head (None: the recipe's)."""
    from dd2dist.nets.student import StudentNet

    # "sampling": what evaluation samples with (the head folded at t = 1, StudentNet.for_sampling); "training": the
    # StudentNet itself, to measure what the folding buys
    if head_form not in ("sampling", "training"):
        raise ValueError(f"head_form must be 'sampling' or 'training', got {head_form!r}")
    teacher, sampling = build_benchmark_teacher(model)
    head = student_cfg or generator_head(model)
    if head_width or head_depth:
        head = replace(head, head_width=head_width or head.head_width, head_depth=head_depth or head.head_depth)
    student = StudentNet(teacher, head, init_adapter=False).eval().requires_grad_(False)
    teacher, student = teacher.to(device, dtype), student.to(device, dtype)
    n_teacher = sum(p.numel() for n, p in teacher.named_parameters() if not n.startswith("tokenizer."))
    n_generator = sum(p.numel() for p in student.parameters())
    generator = student.for_sampling() if head_form == "sampling" else student
    spec = compact_spec or compact_head_spec(model)
    compact = None
    if spec is not None:
        with torch.random.fork_rng(devices=[]):  # random weights: speed does not depend on them
            torch.manual_seed(0)
            head_c = CompactHead(teacher.embed_dim, teacher.hidden_dim, spec, time=student.generator_time)
        compact = student.for_sampling(head_c.to(device, dtype).folded())  # folded, as evaluation samples it
    weights = guidance_weights(sampling, teacher.step_of_token, len(teacher.steps))
    cfg_on = bool((weights != 1).any())
    rows = []
    for B in batch_sizes:
        calls = _timed_calls(teacher, generator, sampling, B, device, dtype, compact)
        timings = {}
        timings["one_step"], timings["teacher_forced"], floor_ratio = time_pair(
            calls["one_step"], calls["teacher_forced"], warmup, repeats, device)
        compact_ratio = None
        if compact is not None:
            timings["one_step_compact"], _, compact_ratio = time_pair(
                calls["one_step_compact"], calls["teacher_forced"], warmup, repeats, device)
            log(f"  {model} B={B} one_step_compact: {timings['one_step_compact']['median_s'] * 1e3:.1f} ms")
        for name in TIMINGS:
            if name not in timings:
                timings[name] = time_call(calls[name], warmup, repeats, device)
            log(f"  {model} B={B} {name}: {timings[name]['median_s'] * 1e3:.1f} ms (median of {repeats})")
        med = {k: v["median_s"] for k, v in timings.items()}
        rows.append({
            "model": model, "family": teacher.family, "batch_size": B, "num_tokens": teacher.num_tokens,
            "ar_steps": len(teacher.steps), "teacher_params": n_teacher, "generator_params": n_generator,
            "generator_head": {"width": head.head_width, "depth": head.head_depth,
                               "time_embed_dim": head.time_embed_dim, "form": head_form},
            "sampling": {"guidance_scale": sampling.guidance_scale, "guidance_schedule": sampling.guidance_schedule,
                         "cfg_rows": 2 * B if cfg_on else B},
            "timings": timings,
            "s_per_image": {k: v / B for k, v in med.items()},
            "images_per_s": {k: B / v for k, v in med.items()},
            "speedup_one_step_vs_teacher": med["teacher_ar"] / med["one_step"],
            "speedup_one_step_vs_teacher_with_decode": med["teacher_ar_decode"] / med["one_step_decode"],
            # the median of interleaved per-pair ratios (time_pair), not the ratio of the two medians
            "one_step_over_teacher_forced": floor_ratio,
        })
        if compact is not None:
            rows[-1]["compact_head"] = {"width": spec.width, "depth": spec.depth, "rank": spec.rank}
            rows[-1]["one_step_compact_over_teacher_forced"] = compact_ratio
    return rows


def plot(results: list[dict], path: str) -> str:
    """Bar chart of s/image (log scale) per model and batch: teacher AR vs one-step vs teacher-forced floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nB={r['batch_size']}" for r in results]
    series = [("teacher_ar", "teacher AR (KV cache, CFG)"), ("one_step", "one-step generator"),
              ("teacher_forced", "teacher-forced pass (floor)"), ("teacher_ar_decode", "teacher AR + VQ decode"),
              ("one_step_decode", "one-step + VQ decode"), ("one_step_compact", "one-step, compact head")]
    series = [(k, n) for k, n in series if any(k in r["s_per_image"] for r in results)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    for i, (key, name) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [r["s_per_image"].get(key, float("nan")) for r in results], width, label=name,
               hatch="//" if "decode" in key else None)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per image (median)")
    ax.set_title("one-step generator vs teacher AR sampler (same device and batch)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_speed_benchmark(args: argparse.Namespace) -> dict:
    """Run the benchmark described by the parsed flags of ``jobs/benchmark.py speed``; returns the JSON-ready report."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = []
    load_start = os.getloadavg()[0]
    for model in models:
        true_size = model in TRUE_SIZE
        # CPU: a true-size teacher at batch 64 takes minutes per sample; keep it to batch 1 and few repeats
        bs = [1] if (true_size and device.type == "cpu" and not args.true_size_all_batches) else batch_sizes
        reps = args.true_size_repeats if (true_size and device.type == "cpu") else args.repeats
        warm = min(args.warmup, 1) if (true_size and device.type == "cpu") else args.warmup
        results += benchmark_model(model, bs, warm, reps, device, dtype, log=print if args.verbose else _quiet,
                                   head_width=args.head_width, head_depth=args.head_depth, head_form=args.head_form)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "dtype": args.dtype, "sampler_loop": "eager PyTorch (VAR per-scale KV cache; LlamaGen static KV cache"
        + (", CUDA graph decode step)" if device.type == "cuda" else ")"),
        "decode": "timings named *_decode include the VQ decode; the others exclude it",
        "extrapolated": False,
        # CPU timings on a shared machine are inflated by other processes: record how busy it was
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()},
        "results": results,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        report["plot"] = plot(results, str(out.with_suffix(".png")))
        out.write_text(json.dumps(report, indent=2))
    return report


def _quiet(_: str) -> None:
    return None
