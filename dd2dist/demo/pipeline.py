"""The `make demo` pipeline (``jobs/demo.py`` parses the command line and calls :func:`run_demo`).

Per family: the digits teacher (trained or reused), its teacher-token shards, stage 1 + stage 2 in one Ray Train
launch, the compact sampling head where the recipe enables it, the evaluation (:mod:`dd2dist.demo.evaluation`),
figures (:mod:`dd2dist.demo.figures`) and the family's record (:mod:`dd2dist.demo.report`); then
``<out>/results.json`` and ``<out>/results.md`` for every family. ``--eval-only`` re-evaluates the students an
earlier run left under ``<out>``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dd2dist.demo.report import FAMILIES, family_summary, markdown_tables, verdict_lines
from dd2dist.machine import describe_machine

REPO = Path(__file__).resolve().parents[2]
# The digits cases: the teachers conditioned on the digit's class, or trained with one label for every digit
# (unconditional), where each sample's tokens must agree among themselves on which digit they draw. The suffix of
# their configs: configs/teachers/digits_<family><suffix>.yaml, configs/demo/[smoke_]<family><suffix>.yaml
CASES = {"conditional": "", "unconditional": "_unconditional"}


@dataclass(frozen=True)
class DemoArgs:
    """The command line of ``jobs/demo.py``."""

    quick: bool = False  # smoke-test size: configs/demo/smoke_<family>.yaml
    families: tuple[str, ...] = FAMILIES
    out: str = "runs/demo"
    teachers: str | None = None  # teacher cache; None: runs/teachers, or <out>/teachers with ``quick``
    overrides: tuple[str, ...] = ()  # ``--set`` of every family's recipe
    eval_only: bool = False  # evaluate the students an earlier run trained under ``out``
    case: str = "conditional"  # a key of CASES: which digits teachers


@dataclass(frozen=True)
class DemoPlan:
    """The demo settings that are not part of an experiment config (the config schema has no place for them)."""

    teacher_recipe: Any  # dd2dist.digits.recipe.TeacherRecipe
    token_samples: int  # teacher-token shard samples (stage 1 streams them; the marginals baseline counts them)
    token_workers: int = 2  # Ray actors sampling the teacher
    token_batch: int = 256  # sequences per teacher.sample call while precomputing


def demo_plan(quick: bool) -> DemoPlan:
    from dd2dist.digits.recipe import FULL, QUICK

    if quick:
        return DemoPlan(QUICK, token_samples=64, token_batch=16)
    return DemoPlan(FULL, token_samples=4096)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- configs -------------------------------------------------------------------------------------------------


def recipe_path(family: str, quick: bool, case: str = "conditional") -> Path:
    return REPO / "configs" / "demo" / f"{'smoke_' if quick else ''}{family}{CASES[case]}.yaml"


def family_config(family: str, quick: bool, teacher_ckpt: str | None, run_dir: Path, check_paths: bool = True,
                  extra: tuple[str, ...] = (), case: str = "conditional"):
    """The distillation config of one family with the demo's paths filled in (``extra``: ``--set`` overrides)."""
    from dd2dist.config import load_config

    overrides = [*extra, f"output_dir={run_dir}"]
    if teacher_ckpt:
        overrides.append(f"teacher.checkpoint={teacher_ckpt}")
    # stage 1 streams the teacher-token shards this demo precomputes (the recipes default to online sampling)
    overrides += ["data.source=shards", f"data.shards={run_dir / 'tokens'}"]
    path = recipe_path(family, quick, case)
    cfg = load_config(path, overrides, check_paths=check_paths)
    if cfg.teacher.family != family:
        raise ValueError(f"{path}: teacher.family is {cfg.teacher.family!r}, expected {family!r}")
    if cfg.eval.num_samples % cfg.teacher.arch.num_classes:
        raise ValueError(f"{path}: eval.num_samples ({cfg.eval.num_samples}) must be a multiple "
                         f"of the {cfg.teacher.arch.num_classes} classes (class-balanced evaluation)")
    return cfg


def teacher_config(family: str, case: str = "conditional"):
    from dd2dist.config import load_config

    return load_config(REPO / "configs" / "teachers" / f"digits_{family}{CASES[case]}.yaml")


def stage1_iterations(cfg) -> int:
    from dd2dist.method.schedule import build_schedule

    return sum(p.iterations for p in build_schedule(cfg).phases if p.stage == "stage1")


# ---- steps of one family -------------------------------------------------------------------------------------


def clean_run_dir(run_dir: Path) -> None:
    """Remove the students of an earlier demo run (the teacher-token shards under ``tokens/`` are kept)."""
    for name in ("checkpoints", "ray", "export", "workers", "eval", "mlflow_run.json", "config.yaml"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def precompute_tokens(cfg, plan: DemoPlan, tokens_dir: Path) -> dict:
    """Teacher-token shards (resumed / reused when complete for the same teacher and settings)."""
    from dd2dist.data import teacher_id
    from dd2dist.pipelines.teacher_tokens import MANIFEST, precompute_teacher_tokens

    manifest_path = tokens_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        same = (old.get("settings", {}).get("teacher_id") == teacher_id(cfg.teacher, cfg.seed)
                and old.get("num_samples") == plan.token_samples
                and old.get("settings", {}).get("batch_size") == plan.token_batch)
        if not same:  # another teacher or size: these shards cannot be resumed, start over
            shutil.rmtree(tokens_dir)
    shard_size = max(1, math.ceil(plan.token_samples / (2 * plan.token_workers)))  # >= 2 shards per rank
    return precompute_teacher_tokens(cfg, plan.token_samples, tokens_dir, workers=plan.token_workers,
                                     batch_size=plan.token_batch, shard_size=shard_size)


def train_students(cfg, run_dir: Path) -> dict:
    """Stage 1 then stage 2 in one Ray Train launch; returns the launch summary and the split of its time.

    The workers export the stage-1 student to ``<run>/export/stage1_student.safetensors`` when stage 2 takes over
    (``dd2dist.launch.callbacks.PhaseExport``; ``dd2dist.eval.run_eval`` evaluates it from there). The
    stage-1 time is the launch's start to that file's write (start-up included), stage 2 the rest.
    """
    from dd2dist.launch.preflight import validate_run
    from dd2dist.launch.ray_train import STAGE1_FILE, export_dir, launch

    validate_run(cfg)
    stage1_file = export_dir(cfg) / STAGE1_FILE
    t0, wall0 = time.perf_counter(), time.time()
    summary = launch(cfg)
    t2 = time.perf_counter()
    if not summary.get("export"):
        raise RuntimeError(f"stage 2 finished without an export under {export_dir(cfg)}")
    if not stage1_file.is_file():
        raise RuntimeError(f"the run left no stage-1 student at {stage1_file}")
    seconds_stage1 = min(max(0.0, stage1_file.stat().st_mtime - wall0), t2 - t0)
    return {"stage2": summary, "stage1_file": str(stage1_file),
            "seconds_stage1": seconds_stage1, "seconds_stage2": (t2 - t0) - seconds_stage1}


def fit_or_reuse_compact_head(cfg, run_dir: Path, reuse: bool = False) -> dict:
    """The compact sampling head of ``cfg.compact_head`` fitted to the exported generator (``--eval-only`` keeps
    the one an earlier run fitted); returns its fit report. Evaluation then samples it as ``one_step_compact``."""
    from dd2dist.eval.compact import export_compact_head
    from dd2dist.nets.compact_head import COMPACT_HEAD_FILE

    path = run_dir / "export" / COMPACT_HEAD_FILE
    if reuse and path.with_suffix(".json").is_file():
        log(f"[{cfg.teacher.family}]   --eval-only: the compact head an earlier run fitted, {path}")
        return json.loads(path.with_suffix(".json").read_text())
    return export_compact_head(cfg, log=lambda m: log(f"[{cfg.teacher.family}]   {m}"))


def extra_eval_overrides(overrides: tuple[str, ...]) -> list[str]:
    """With ``--eval-only`` only ``eval.*`` overrides apply: the rest describes training that already happened."""
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ValueError(f"--eval-only takes only eval.* overrides, got {bad}")
    return list(overrides)


def trained_students(cfg, run_dir: Path) -> dict:
    """``train_students``' record for students an earlier demo run trained (``--eval-only``).

    Their training time is read back: from that run's ``eval/summary.json`` when it got that far, else from the
    MLflow run (its start to the last stage-1 metric, then to the last metric; launch start-up included).
    """
    from mlflow.tracking import MlflowClient

    from dd2dist.launch.ray_train import checkpoint_root, export_dir
    from dd2dist.train import checkpoint as ckpt

    stage1_file, export = export_dir(cfg) / "stage1_student.safetensors", export_dir(cfg) / "generator.safetensors"
    latest = ckpt.latest_checkpoint(checkpoint_root(cfg))
    for path in (stage1_file, export):
        if not path.is_file():
            raise FileNotFoundError(f"--eval-only: {path} is missing (run the demo without --eval-only first)")
    iteration = int(ckpt.read_json(latest / ckpt.STATE_FILE)["iteration"]) if latest else 0
    record = {"stage2": {"export": str(export), "iteration": iteration},
              "stage1_file": str(stage1_file)}
    previous = run_dir / "eval" / "summary.json"
    if previous.is_file():
        steps = json.loads(previous.read_text())["seconds_by_step"]
        return {**record, "seconds_stage1": steps["stage1"], "seconds_stage2": steps["stage2"],
                "timing_source": str(previous)}
    stored = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=stored["tracking_uri"])
    start = client.get_run(stored["run_id"]).info.start_time
    n1 = stage1_iterations(cfg)
    stamps = [(m.step, m.timestamp) for key in ("step_time_s",)
              for m in client.get_metric_history(stored["run_id"], key)]
    end1 = max(t for step, t in stamps if step <= n1)
    end2 = max(t for _, t in stamps)
    return {**record, "seconds_stage1": (end1 - start) / 1000, "seconds_stage2": (end2 - end1) / 1000,
            "timing_source": "MLflow timestamps of the training run"}


# ---- driver --------------------------------------------------------------------------------------------------


def _train_teacher_task(family: str, case: str, teachers_dir: str, recipe, evaluate: bool) -> dict:
    """One family's teacher, in a Ray worker (1 CPU): the report of ``train_digits_teacher``."""
    os.chdir(REPO)
    import torch

    from dd2dist.digits.teacher_job import train_digits_teacher

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report = train_digits_teacher(teacher_config(family, case), teachers_dir, recipe,
                                  log=lambda m: log(f"[{family}]   {m}"), evaluate=evaluate)
    return {**report, "train_seconds": time.perf_counter() - t0}


def train_teachers_concurrently(families: list[str], args: DemoArgs, plan: DemoPlan) -> dict[str, dict]:
    """Train (or reuse) every family's teacher at once, one Ray task of 1 CPU each.

    Teacher training is single-threaded (small convolutions and a 4-layer transformer gain little from a second
    thread), so on a 2-core machine the two teachers take the time of the slower one. The weights are the ones
    a training in this process gives: each task runs the same seeded code with one thread (OMP_NUM_THREADS=1, as
    Ray sets it for a 1-CPU task and the Makefile for the demo). ``run_family`` then finds them cached.
    """
    import ray

    task = ray.remote(num_cpus=1)(_train_teacher_task)
    log(f"teachers of {', '.join(families)}: trained (or reused) concurrently in {args.teachers}, one CPU each")
    refs = {f: task.remote(f, args.case, args.teachers, plan.teacher_recipe, not args.quick) for f in families}
    return {f: ray.get(ref) for f, ref in refs.items()}


def run_family(family: str, args: DemoArgs, plan: DemoPlan, trained_teacher: dict | None = None) -> dict:
    import torch

    from dd2dist.demo.evaluation import evaluate_family, log_evaluation
    from dd2dist.demo.figures import save_sample_figure
    from dd2dist.digits.teacher_job import train_digits_teacher
    from dd2dist.tracking import open_run

    t_start = time.perf_counter()
    out = Path(args.out).absolute()
    run_dir = out / family
    steps: dict[str, float] = {}

    t0 = time.perf_counter()
    if args.eval_only:  # the resolved config the students were trained with (teacher, its sampling target, ...)
        from dd2dist.config import load_config

        trained = load_config(run_dir / "config.yaml", extra_eval_overrides(args.overrides), check_paths=False)
        log(f"[{family}] 1/5 --eval-only: the config the students were trained with, {run_dir / 'config.yaml'}")
        report = {"checkpoint": trained.teacher.checkpoint, "reused": True, "seconds": None}
    else:
        log(f"[{family}] 1/5 teacher (train or reuse) in {args.teachers}")
        report = train_digits_teacher(teacher_config(family, args.case), args.teachers, plan.teacher_recipe,
                                      log=lambda m: log(f"[{family}]   {m}"), evaluate=not args.quick)
    steps["teacher"] = time.perf_counter() - t0
    # trained a moment ago alongside the other family's (train_teachers_concurrently): its own time counts here
    own_teacher_seconds = 0.0
    if trained_teacher is not None and not trained_teacher.get("reused"):
        own_teacher_seconds = trained_teacher["train_seconds"]
        steps["teacher"] += own_teacher_seconds
        report = {**report, "reused": False}
    if args.eval_only:
        cfg = trained
    else:
        cfg = family_config(family, args.quick, report["checkpoint"], run_dir, check_paths=False,
                            extra=args.overrides, case=args.case)
        clean_run_dir(run_dir)

    t0 = time.perf_counter()
    token_info: dict[str, Any] = {"stage1_source": cfg.data.source}
    log(f"[{family}] 2/5 teacher-token shards: {plan.token_samples} samples on {plan.token_workers} Ray actors")
    manifest_path = run_dir / "tokens" / "manifest.json"
    if args.eval_only and manifest_path.is_file() and json.loads(manifest_path.read_text()).get("complete"):
        manifest = json.loads(manifest_path.read_text())  # as the earlier run left them
    else:
        manifest = precompute_tokens(cfg, plan, run_dir / "tokens")
    token_info.update(dir=str(run_dir / "tokens"), num_samples=manifest["num_samples"],
                      num_shards=manifest["num_shards"], teacher_id=manifest["teacher_id"])
    if cfg.data.source == "shards" and not args.eval_only:
        cfg = family_config(family, args.quick, report["checkpoint"], run_dir, extra=args.overrides,
                            case=args.case)  # the shards exist now
    else:
        log(f"[{family}]   data.source={cfg.data.source}: stage 1 samples the teacher online (same target)")
    steps["tokens"] = time.perf_counter() - t0

    if args.eval_only:
        log(f"[{family}] 3/5 --eval-only: the students trained by an earlier demo run in {run_dir}")
        train = trained_students(cfg, run_dir)
    else:
        log(f"[{family}] 3/5 stage 1 + stage 2 on Ray Train, {cfg.launch.num_workers} {cfg.engine.kind} workers")
        train = train_students(cfg, run_dir)
    steps["stage1"], steps["stage2"] = train["seconds_stage1"], train["seconds_stage2"]
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # training's workers are gone: the fit and evaluation
    compact_report = None
    if cfg.compact_head.enabled:
        log(f"[{family}] 3/5 compact sampling head fitted to the generator ({cfg.compact_head.steps} steps)")
        t0 = time.perf_counter()
        compact_report = fit_or_reuse_compact_head(cfg, run_dir, reuse=args.eval_only)
        steps["compact_head"] = time.perf_counter() - t0

    log(f"[{family}] 4/5 evaluation: {cfg.eval.num_samples} samples per sampler against an independent teacher "
        "draw (and the held-out digits)")
    t0 = time.perf_counter()
    evaluation = evaluate_family(cfg, run_dir, log=lambda m: log(f"[{family}] {m}"))
    steps["evaluation"] = time.perf_counter() - t0

    log(f"[{family}] 5/5 figures and MLflow")
    grid = save_sample_figure(evaluation["samplers"], run_dir / "eval" / "samples.png",
                              f"{family} digits (rows: classes 0-9)" if args.case == "conditional"
                              else f"{family} digits, unconditional teacher")
    # eval/<sampler>/<metric> at the final iteration, grids, report
    run_id = log_evaluation(cfg, evaluation, step=train["stage2"]["iteration"])
    tracker = open_run(cfg)  # the same run again: the demo's own artefacts, then FINISHED
    mlflow_info = {"run_id": run_id, "tracking_uri": tracker.tracking_uri if tracker else None,
                   "experiment": cfg.tracking.experiment}
    seconds = time.perf_counter() - t_start + own_teacher_seconds
    if args.eval_only:  # the training of the earlier run, read back (trained_students)
        seconds += steps["stage1"] + steps["stage2"]
    run = {"timing_source": train.get("timing_source", "measured in this run"), "seconds_by_step": steps,
            "token_shards": token_info, "mlflow": mlflow_info, "grid": str(grid)}
    summary = family_summary(evaluation, train, report, cfg, seconds, run)
    if compact_report is not None:
        summary["compact_head"] = compact_report
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if tracker is not None:
        tracker.log_artifact(grid, "eval")
        tracker.log_artifact(run_dir / "eval" / "summary.json", "eval")
        tracker.set_tags({"demo": "quick" if args.quick else "full"})
        from dd2dist.demo.figures import loss_histories

        summary["loss_history"] = loss_histories(tracker.run_id, tracker.tracking_uri)
        tracker.close("FINISHED")
    return summary


def run_demo(args: DemoArgs) -> int:
    """Run the demo; the exit code: 0 done, 2 a recipe does not load (nothing ran), 1 a step failed."""
    families = list(args.families)
    out = Path(args.out).absolute()
    args = replace(args, teachers=str(Path(args.teachers or (out / "teachers" if args.quick
                                                             else REPO / "runs" / "teachers")).absolute()))
    for family in families:  # every config error before anything runs
        try:
            family_config(family, args.quick, None, out / family, check_paths=False, extra=args.overrides,
                          case=args.case)
        except (ValueError, FileNotFoundError) as err:
            print(f"demo: configuration error: {err}", file=sys.stderr)
            return 2
    os.chdir(REPO)  # configs name relative include paths; the runs are addressed absolutely
    plan = demo_plan(args.quick)

    from dd2dist.launch.ray_env import init_local_ray

    t0 = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    owns_ray = init_local_ray(num_cpus=2)  # one Ray for every step: precompute actors and both trainings
    results: dict[str, Any] = {}
    code = 0
    try:
        teachers = {} if args.eval_only else train_teachers_concurrently(families, args, plan)
        seconds_teachers = time.perf_counter() - t0
        for family in families:
            results[family] = run_family(family, args, plan, teachers.get(family))
    except Exception as err:  # noqa: BLE001 - report which stage failed, then exit non-zero
        import traceback

        traceback.print_exc()
        print(f"demo: failed: {type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    if code == 0:
        histories = {f: r.pop("loss_history", {}) for f, r in results.items()}
        from dd2dist.demo.figures import save_loss_curves

        curves = save_loss_curves(histories, out / "loss_curves.png") if any(histories.values()) else None

        results["settings"] = {
            "quick": args.quick, "case": args.case, "families": families, "started": started_at,
            "seconds_total": time.perf_counter() - t0, "teachers_dir": args.teachers,
            # wall time of the concurrent teacher step (each family's seconds_by_step.teacher is its own training)
            "seconds_teachers_concurrent": None if args.eval_only else seconds_teachers,
            "recipes": {f: str(recipe_path(f, args.quick, args.case).relative_to(REPO)) for f in families},
            "overrides": list(args.overrides), "eval_only": args.eval_only,
            "token_samples": plan.token_samples, "teacher_recipe": asdict(plan.teacher_recipe),
            "machine": {**describe_machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "loss_curves": str(curves) if curves else None,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "results.md").write_text(markdown_tables(results))
        print("\n" + markdown_tables(results))
        print("\n".join(verdict_lines(results)), flush=True)
        print(f"results: {out / 'results.json'} (tables: {out / 'results.md'}; loss curves: {curves}); "
              f"total {results['settings']['seconds_total']:.0f} s")
    return code
