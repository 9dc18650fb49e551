"""Benchmarks: scripts that print their figures and save them as JSON (never timed tests).

    python jobs/benchmark.py toy   --family var --seed 0 --out runs/bench/toy_var.json   # exact one-step check
    python jobs/benchmark.py data  --out runs/bench/data.json                            # streaming / DALI / sampling
    python jobs/benchmark.py train --out runs/bench/train.json                           # stage-2 iteration on Ray
    python jobs/benchmark.py speed --out runs/bench/speed.json                           # one-step vs AR sampler
    python jobs/benchmark.py fidelity --run runs/demo/var --out runs/bench/fidelity_var.json  # samplers vs teacher
    python jobs/benchmark.py probe --run runs/demo/llamagen                              # earlier noise seen?
    python jobs/benchmark.py ceiling --run runs/demo/llamagen --out runs/bench/ceiling.json  # one-pass map's limit
    python jobs/benchmark.py odemap --run runs/demo/llamagen                             # PF-ODE map converged?
    python jobs/benchmark.py stepcost --run runs/demo/llamagen --variant student.posterior_head=false  # step cost
    python jobs/benchmark.py manifest --out runs/bench/manifest.json                     # checkpoint manifest cost

Each subcommand takes its own flags (``python jobs/benchmark.py toy --help``); the measurements live in their
subsystems (dd2dist/bench/, dd2dist/eval/speed.py, fidelity.py, noise_probe.py, one_pass_ceiling.py, ode_map.py),
this file only parses and prints.
Each subcommand imports its own stack when it runs, so that one benchmark does not load another's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def _doc(module: str) -> str:
    return importlib.import_module(module).__doc__ or ""


def _summary(module: str) -> str:
    """The first paragraph of a module's docstring: the subcommand's description."""
    return _doc(module).split("\n\n")[0]


TOY_CONFIGS = {"var": "configs/experiments/exact_toy_var.yaml",
               "llamagen": "configs/experiments/exact_toy_llamagen.yaml"}


def _write_report(out: str | Path | None, report: dict) -> None:
    """Write a benchmark's report as JSON to ``out`` (parents created; nothing without ``out``)."""
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {out}")


def _provenance() -> dict:
    """Where a figure was measured: date, machine, processor, its CPU kernel level, cores."""
    from dd2dist.machine import describe_machine

    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), **describe_machine()}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py toy", description=_summary("dd2dist.bench.toy"))
    p.add_argument("--family", choices=("var", "llamagen"), default="var")
    p.add_argument("--seed", type=int, default=0, help="teacher table and training seed")
    p.add_argument("--out", type=str, default=None, help="write the result JSON here")
    p.add_argument("--vocab", type=int, default=4, help="codebook size V")
    p.add_argument("--embed-dim", type=int, default=3, help="code dimension Ce")
    p.add_argument("--tokens", type=int, default=4, help="LlamaGen layout: N tokens, a square (grid = sqrt N)")
    p.add_argument("--patch-nums", type=_ints, default=(1, 2), help="VAR layout: scale sides, e.g. 1,2")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--dependence", choices=("prefix", "markov"), default="prefix")
    p.add_argument("--sharpness", type=float, default=3.0)
    p.add_argument("--width", type=int, default=None,
                   help="teacher transformer width, the students' backbone (default: var 64, llamagen 32)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: var 4, llamagen 2)")
    p.add_argument("--budget-seconds", type=float, default=720.0,
                   help="stage 1 + stage 2 training wall time (720: with evaluations ~15 min on a quiet 2-core CPU)")
    p.add_argument("--generator-steps", type=int, default=0,
                   help="also stop stage 2 after this many generator steps (0 = the time budget alone)")
    p.add_argument("--eval-every", type=float, default=60.0, help="stage-2 seconds between TV-curve points")
    p.add_argument("--samples", type=int, default=1_000_000, help="one-step samples for the final TVs")
    p.add_argument("--curve-samples", type=int, default=50_000, help="samples per class per curve point")
    p.add_argument("--multistep-samples", type=int, default=20_000, help="0 skips the AR-diffusion sampler")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = as set by OMP_NUM_THREADS)")
    p.add_argument("--config", type=str, default=None,
                   help="training YAML (default configs/experiments/exact_toy_<family>.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set stage2.generator_lr=1e-3)")
    return p


def toy_spec(args: argparse.Namespace):
    from dd2dist.bench.toy import FAMILY_HEADS, FAMILY_WIDTH
    from dd2dist.bench.toy_teacher import ToyTeacherSpec

    grid = math.isqrt(args.tokens)
    if args.family == "llamagen" and grid * grid != args.tokens:
        raise SystemExit(f"--tokens must be a square for llamagen (a grid x grid raster), got {args.tokens}")
    return ToyTeacherSpec(family=args.family, vocab=args.vocab, embed_dim=args.embed_dim,
                          patch_nums=tuple(args.patch_nums), grid=grid, num_classes=args.classes,
                          dependence=args.dependence, sharpness=args.sharpness,
                          width=args.width or FAMILY_WIDTH[args.family], depth=args.depth,
                          heads=args.heads or FAMILY_HEADS[args.family], seed=args.seed)


def toy(argv: list[str]) -> int:
    """``benchmark.py toy``: run the exact check, print a summary, write JSON to ``--out``."""
    from dd2dist.bench.toy import ToyRunOptions, run_toy, toy_config
    from dd2dist.config import load_config

    args = toy_parser().parse_args(argv)
    spec = toy_spec(args)
    config_path = args.config or str(REPO / TOY_CONFIGS[args.family])
    base = load_config(config_path, args.overrides, check_paths=False)
    if base.teacher.family != args.family:
        raise SystemExit(f"{config_path}: teacher.family is {base.teacher.family!r} but --family is {args.family!r}")
    cfg = toy_config(base, spec, args.seed)
    opts = ToyRunOptions(budget_seconds=args.budget_seconds, max_generator_steps=args.generator_steps,
                         eval_every_seconds=args.eval_every,
                         curve_samples_per_class=args.curve_samples, final_samples=args.samples,
                         multistep_samples=args.multistep_samples, threads=args.threads)
    result = run_toy(spec, cfg, opts)
    result.training["config"] = config_path
    print(result.summary())
    _write_report(args.out, asdict(result))
    return 0


def data(argv: list[str]) -> int:
    """``benchmark.py data``: streaming rate, DALI vs PIL decoding, teacher sampling on Ray; prints the JSON."""
    from dd2dist.bench.data import run_data_benchmark

    parser = argparse.ArgumentParser(prog="benchmark.py data", description=_summary("dd2dist.bench.data"))
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument("--parts", nargs="+", default=["stream", "decode", "sample"],
                        choices=["stream", "decode", "sample"])
    parser.add_argument("--batch-size", type=int, default=64, help="streaming batch per rank")
    parser.add_argument("--batches", type=int, default=200, help="streaming batches timed")
    parser.add_argument("--consumption-rate", type=float, default=None,
                        help="training samples/s per worker to compare with (default: the paper's, per GPU)")
    parser.add_argument("--images", type=int, default=256, help="JPEGs decoded")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--config", default=None, help="teacher config for the sampling part (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--num-samples", type=int, default=1024, help="teacher samples per worker setting")
    parser.add_argument("--sample-batch", type=int, default=32)
    args = parser.parse_args(argv)
    result = run_data_benchmark(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def train_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py train", description=_doc("dd2dist.bench.train"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--batch", type=int, default=64,
                        help="sequences per worker per iteration (64: the paper's micro-batches are 32-128 per GPU)")
    parser.add_argument("--k", type=int, default=2, help="guidance steps per generator step")
    parser.add_argument("--width", type=int, default=128, help="tiny VAR teacher width (CPU runs)")
    parser.add_argument("--depth", type=int, default=4, help="tiny VAR teacher depth (CPU runs)")
    parser.add_argument("--warmup", type=int, default=6, help="iterations before timing")
    parser.add_argument("--iterations", type=int, default=24, help="timed iterations")
    parser.add_argument("--teacher-zero", type=int, default=0, choices=(0, 3),
                        help="teacher ZeRO stage of the 1-vs-2-worker scaling runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--gpu", action="store_true", help="one-GPU true-size stage-2 step instead")
    parser.add_argument("--geometry", default="var_d16", help="teacher geometry for --gpu (configs/teachers/*)")
    parser.add_argument("--gpu-cycles", type=int, default=3, help="timed generator cycles for --gpu")
    parser.add_argument("--device", default="cuda", help="device of the --gpu run (cpu: a smoke check)")
    parser.add_argument("--teacher-bf16", action="store_true", help="--gpu: store the teacher in bf16")
    return parser.parse_args(argv)


def train(argv: list[str]) -> int:
    """``benchmark.py train``: a stage-2 iteration on Ray (or one true-size GPU step); prints the JSON."""
    from dd2dist.bench.train import run_train_benchmark

    args = train_args(argv)
    result = run_train_benchmark(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


def manifest(argv: list[str]) -> int:
    """``benchmark.py manifest``: the cost of checkpoint manifests; prints the JSON."""
    from dd2dist.bench.checkpoint_manifest import RECIPES, measure_recipe, measure_run

    parser = argparse.ArgumentParser(prog="benchmark.py manifest",
                                     description=_doc("dd2dist.bench.checkpoint_manifest"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-dir", type=Path, default=None, help="also time verify() on a finished run")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "python": platform.python_version(),
              "command": "python jobs/benchmark.py manifest " + " ".join(argv),
              "recipes": {name: measure_recipe(RECIPES[name], args.repeats) for name in args.recipes}}
    if args.run_dir is not None:
        result["run"] = measure_run(args.run_dir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def speed_parser() -> argparse.ArgumentParser:
    from dd2dist.eval.speed import DEFAULT_MODELS

    p = argparse.ArgumentParser(prog="benchmark.py speed", description="one-step generator vs teacher AR sampler")
    p.add_argument("--out", default=None, help="JSON path; the PNG plot goes next to it (.png)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma list: digits_var, digits_llamagen, var_d16..var_d30, llamagen_b, llamagen_l")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--true-size-repeats", type=int, default=2, help="repeats for true-size models on CPU")
    p.add_argument("--true-size-all-batches", action="store_true",
                   help="also run true-size models at every batch size on CPU")
    p.add_argument("--head-width", type=int, default=0, help="override the generator head's width (0: the recipe's)")
    p.add_argument("--head-depth", type=int, default=0, help="override the generator head's depth (0: the recipe's)")
    p.add_argument("--head-form", default="sampling", choices=("sampling", "training"),
                   help="time the generator as evaluation samples it (head folded at t = 1) or in its training form")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--verbose", action="store_true", default=True)
    p.add_argument("--quiet", dest="verbose", action="store_false")
    return p


def speed(argv: list[str]) -> int:
    """``jobs/benchmark.py speed``: print a table, save JSON + PNG with ``--out``."""
    from dd2dist.eval.speed import run_speed_benchmark

    args = speed_parser().parse_args(argv)
    report = run_speed_benchmark(args)
    print(f"device {report['device']} ({report['device_type']}, {report['threads']} threads, {report['dtype']})")
    print(f"{'model':<16}{'B':>4}{'teacher AR':>12}{'+decode':>10}{'one-step':>11}{'+decode':>10}"
          f"{'TF pass':>10}{'speed-up':>10}{'1step/TF':>10}{'compact':>9}{'c/TF':>7}   (ms per batch, median)")
    for r in report["results"]:
        t = {k: v["median_s"] * 1e3 for k, v in r["timings"].items()}
        print(f"{r['model']:<16}{r['batch_size']:>4}{t['teacher_ar']:>12.1f}{t['teacher_ar_decode']:>10.1f}"
              f"{t['one_step']:>11.1f}{t['one_step_decode']:>10.1f}{t['teacher_forced']:>10.1f}"
              f"{r['speedup_one_step_vs_teacher']:>9.1f}x{r['one_step_over_teacher_forced']:>10.2f}"
              + (f"{t['one_step_compact']:>9.1f}{r['one_step_compact_over_teacher_forced']:>7.2f}"
                 if "one_step_compact" in t else f"{'-':>9}{'-':>7}"))
    if args.out:
        print(f"wrote {args.out} and {report['plot']}")
    return 0


def fidelity_parser() -> argparse.ArgumentParser:
    from dd2dist.eval.fidelity import ALL_SAMPLERS, DEFAULT_SAMPLERS, FidelityOptions

    p = argparse.ArgumentParser(prog="benchmark.py fidelity", description=_summary("dd2dist.eval.fidelity"))
    p.add_argument("--run", required=True, help="a run directory (its config.yaml and export/)")
    p.add_argument("--out", default=None, help="write the report JSON here")
    p.add_argument("--samples", type=int, default=FidelityOptions.num_samples, help="samples per set")
    p.add_argument("--batch-size", type=int, default=FidelityOptions.batch_size)
    p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS),
                   help="comma-separated subset of " + ", ".join(ALL_SAMPLERS) + " (default: all but stage1_ar)")
    p.add_argument("--space", default="auto", choices=("auto", "digits", "inception"), help="feature space")
    return p


def fidelity(argv: list[str]) -> int:
    """``benchmark.py fidelity``: score a run's samplers against the teacher, print a table, write JSON."""
    from dd2dist.eval.fidelity import FidelityOptions, fidelity_benchmark, summary_lines

    args = fidelity_parser().parse_args(argv)
    samplers = tuple(s.strip() for s in args.samplers.split(",") if s.strip())
    try:
        opts = FidelityOptions(num_samples=args.samples, batch_size=args.batch_size, samplers=samplers)
        report = fidelity_benchmark(args.run, opts, args.space)
    except (FileNotFoundError, ValueError) as err:
        print(f"benchmark.py fidelity: {err}")
        return 2
    print("\n".join(summary_lines(report)))
    _write_report(args.out, report)
    return 0

def probe(argv: list[str]) -> int:
    """``benchmark.py probe --run DIR``: the probe for a run's exported generator (and its stage-1 student)."""
    from dd2dist.eval.noise_probe import probe_run

    p = argparse.ArgumentParser(prog="benchmark.py probe", description=_summary("dd2dist.eval.noise_probe"))
    p.add_argument("--run", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--samples", type=int, default=4000)
    args = p.parse_args(argv)
    report = probe_run(args.run, args.samples)
    for name, r in report["nets"].items():
        print(f"{report['family']} {name}: earlier-noise probe R^2 {r['mean']:.3f} "
              + " ".join(f"{k}:{v:.2f}" for k, v in list(r["by_pair"].items())[:8]))
    _write_report(args.out, report)
    return 0


def ceiling(argv: list[str]) -> int:
    """``benchmark.py ceiling --run DIR``: train the categorical one-pass generator on the run's teacher and score it
    beside the teacher's second draw, the product of marginals and the run's one-step generator."""
    from dd2dist.eval.fidelity import FidelityOptions, summary_lines
    from dd2dist.eval.one_pass_ceiling import CeilingOptions, ceiling_benchmark
    from dd2dist.method.losses import CATEGORICAL_DIVERGENCES
    from dd2dist.nets.categorical import CODE_ORDERS
    from dd2dist.nets.neighbour_picks import NEIGHBOUR_PICKS
    from dd2dist.nets.vector_input import NOISE_INPUTS

    p = argparse.ArgumentParser(prog="benchmark.py ceiling", description=_summary("dd2dist.eval.one_pass_ceiling"))
    p.add_argument("--run", required=True, help="a run directory (its config.yaml names the teacher)")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=CeilingOptions.steps)
    p.add_argument("--batch-size", type=int, default=CeilingOptions.batch_size)
    p.add_argument("--lr", type=float, default=CeilingOptions.lr)
    p.add_argument("--noise-input", default=CeilingOptions.noise_input, choices=NOISE_INPUTS)
    p.add_argument("--extra-layers", type=int, default=CeilingOptions.extra_layers,
                   help="LlamaGen: blocks added after the copied ones, starting as the identity")
    p.add_argument("--code-order", default=CeilingOptions.code_order, choices=CODE_ORDERS,
                   help="the codes' order in the inverse CDF (dd2dist.nets.categorical)")
    p.add_argument("--neighbour-picks", default=CeilingOptions.neighbour_picks, choices=NEIGHBOUR_PICKS,
                   help="LlamaGen: the head reads its own picks there (dd2dist.nets.neighbour_picks)")
    p.add_argument("--neighbour-picks-lr-scale", type=float, default=CeilingOptions.neighbour_picks_lr_scale,
                   help="that head's LR as a multiple of --lr (stage2.neighbour_picks_lr_scale)")
    p.add_argument("--divergence", default=CeilingOptions.divergence, choices=CATEGORICAL_DIVERGENCES,
                   help="the per-position loss (stage2.categorical_divergence)")
    p.add_argument("--seed", type=int, default=CeilingOptions.seed)
    p.add_argument("--samples", type=int, default=FidelityOptions.num_samples, help="samples per set")
    args = p.parse_args(argv)
    opts = CeilingOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, noise_input=args.noise_input,
                          extra_layers=args.extra_layers, code_order=args.code_order,
                          neighbour_picks=args.neighbour_picks,
                          neighbour_picks_lr_scale=args.neighbour_picks_lr_scale, divergence=args.divergence,
                          seed=args.seed)
    fid = FidelityOptions(num_samples=args.samples, samplers=("teacher", "marginals", "one_step"))
    try:
        report = ceiling_benchmark(args.run, opts, fid)
    except (FileNotFoundError, ValueError) as err:
        print(f"benchmark.py ceiling: {err}")
        return 2
    report.update(_provenance(), command="python jobs/benchmark.py ceiling " + " ".join(argv))
    print("\n".join(summary_lines(report)))
    _write_report(args.out, report)
    return 0


def odemap(argv: list[str]) -> int:
    """``benchmark.py odemap --run DIR``: how many PF-ODE steps the run's teacher needs for converged pairs."""
    from dd2dist.eval.ode_map import ode_map_run

    p = argparse.ArgumentParser(prog="benchmark.py odemap", description=_summary("dd2dist.eval.ode_map"))
    p.add_argument("--run", required=True, help="a run directory (its config.yaml names the teacher)")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=_ints, default=(8, 16, 32), help="Heun step counts to score, e.g. 8,16,32")
    p.add_argument("--reference-steps", type=int, default=128)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args(argv)
    report = ode_map_run(args.run, tuple(args.steps), args.reference_steps, args.samples)
    print(f"{report['family']} teacher of {args.run} (stage2.ode_steps {report['configured_ode_steps']}), agreement "
          f"with {report['reference_steps']} steps on {report['samples']} sequences:")
    for s, r in report["steps"].items():
        print(f"  {s:>4} steps: first AR step {r['first_step']:.3f}, all tokens {r['all_tokens']:.3f}")
    _write_report(args.out, report)
    return 0


def stepcost(argv: list[str]) -> int:
    """``benchmark.py stepcost --run DIR --variant K=V[,K=V] ...``: per-step cost of config variants."""
    from dd2dist.bench.step_cost import step_cost

    p = argparse.ArgumentParser(prog="benchmark.py stepcost", description=_summary("dd2dist.bench.step_cost"))
    p.add_argument("--run", required=True, help="a run directory (its config.yaml names the teacher and student)")
    p.add_argument("--variant", action="append", default=None,
                   help="comma-separated KEY=VALUE overrides of the run's config; repeat for each variant (the "
                        "first is the baseline of the ratios; without any: the run's config alone)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="default: the run's stage2.batch_size")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = [tuple(x for x in v.split(",") if x) for v in (args.variant or [""])]
    report = step_cost(args.run, variants, args.repeats, args.iters, args.batch)
    report.update(_provenance())
    for row in report["variants"]:
        print(f"{report['family']} {','.join(row['overrides']) or '(run config)'}: "
              + "  ".join(f"{k} {1000 * s:.1f} ms ({row['ratio'][k]:.3f}x)" for k, s in row["seconds"].items()))
    _write_report(args.out, report)
    return 0


SUBCOMMANDS = {
    "toy": toy,
    "data": data,
    "train": train,
    "speed": speed,
    "fidelity": fidelity,
    "probe": probe,
    "ceiling": ceiling,
    "odemap": odemap,
    "stepcost": stepcost,
    "manifest": manifest,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown benchmark {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        return 0
    return int(SUBCOMMANDS[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
