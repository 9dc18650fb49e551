"""`make demo`: the whole DD2 pipeline end to end on scikit-learn's digits, for both teacher families.

    python jobs/demo.py                                   # full demo (both families), writes runs/demo/
    python jobs/demo.py --quick --out /tmp/demo_quick     # the same path at smoke-test size (tests)
    python jobs/demo.py --families var --out runs/demo_var --set stage2.generator_steps=600   # any recipe key

Per family (``var``, ``llamagen``), with the recipe ``configs/demo/<family>[_quick].yaml``:

1. teacher: train (or reuse, cached by config hash) the small VQ tokenizer + AR teacher on the digits train split
   (``dd2dist.digits.teacher_job``: PNG shards -> DALI -> token shards -> AR training);
2. teacher-token shards: the teacher sampled with the distillation target across 2 Ray actors
   (``data_pipelines.teacher_tokens``);
3. stage 1 (GTS) then stage 2 (CSD / FCS) with 2 DeepSpeed workers under Ray Train on one embedded local Ray
   (``dd2dist.launch.ray_train.launch``), one launch for both stages; the workers export the stage-1 student
   when stage 2 takes over, so that it can be evaluated; then, where the recipe sets ``compact_head.enabled``, a
   compact sampling head is regressed onto the generator's head (``dd2dist.nets.compact_head``: the one-step
   generator's speed at the digits size is its head's);
4. evaluation against the held-out digits in the digits-classifier feature space (torch-fidelity FID, IS,
   precision / recall; class consistency): teacher samples, the stage-1 model used as a one-step generator, the
   DD2 one-step generator (continuous tokens decoded as they are, snapped to the nearest codes, and sampled with
   the compact head on the same noise), teacher-refined
   k-step sampling and the product-of-marginals baseline (tokens drawn independently per position from the
   class-conditional marginals of the teacher-token shards);
5. sample grids and loss curves (PNG), the metrics and artefacts logged to the family's MLflow run.

Writes ``<out>/results.json`` (per family: ``fid_*``, ``precision_*``, ``recall_*``, ``class_consistency_*``,
``seconds``, the sampling settings, classifier accuracy, MLflow run) and ``<out>/results.md`` (the tables).
Every run of the demo trains the students afresh; teachers and teacher-token shards are reused when present.
Exit codes: 0 done, 2 bad arguments / configuration, 1 a stage failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

FAMILIES = ("var", "llamagen")
# What a per-family result must hold (tests/test_demo_quick.py checks these keys).
REQUIRED_KEYS = ("fid_teacher", "fid_stage1", "fid_one_step", "class_consistency_teacher",
                 "class_consistency_one_step", "seconds")
# The quality targets: DD2 one-step FID <= 1.6x the teacher's; class consistency within 0.05 of it.
FID_RATIO_TARGET = 1.6
CONSISTENCY_GAP_TARGET = 0.05


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


def recipe_path(family: str, quick: bool) -> Path:
    return REPO / "configs" / "demo" / f"{family}{'_quick' if quick else ''}.yaml"


def family_config(family: str, quick: bool, teacher_ckpt: str | None, run_dir: Path, check_paths: bool = True,
                  extra: tuple[str, ...] = ()):
    """The distillation config of one family with the demo's paths filled in (``extra``: ``--set`` overrides)."""
    from dd2dist.config import load_config

    overrides = [*extra, f"output_dir={run_dir}"]
    if teacher_ckpt:
        overrides.append(f"teacher.checkpoint={teacher_ckpt}")
    # stage 1 streams the teacher-token shards this demo precomputes (the recipes default to online sampling)
    overrides += ["data.source=shards", f"data.shards={run_dir / 'tokens'}"]
    cfg = load_config(recipe_path(family, quick), overrides, check_paths=check_paths)
    if cfg.teacher.family != family:
        raise ValueError(f"{recipe_path(family, quick)}: teacher.family is {cfg.teacher.family!r}, expected {family!r}")
    if cfg.eval.num_samples % cfg.teacher.arch.num_classes:
        raise ValueError(f"{recipe_path(family, quick)}: eval.num_samples ({cfg.eval.num_samples}) must be a multiple "
                         f"of the {cfg.teacher.arch.num_classes} classes (class-balanced evaluation)")
    return cfg


def teacher_config(family: str):
    from dd2dist.config import load_config

    return load_config(REPO / "configs" / "digits" / f"{family}.yaml")


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
    from data_pipelines.teacher_tokens import MANIFEST, precompute_teacher_tokens
    from dd2dist.data import teacher_id

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
    (``dd2dist.launch.ray_train.stage1_export_hook``; ``dd2dist.eval.run_eval`` evaluates it from there). The
    stage-1 time is the launch's start to that file's write (start-up included), stage 2 the rest.
    """
    from dd2dist.launch.ray_train import STAGE1_FILE, export_dir, launch
    from dd2dist.launch.validate import validate_run

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


# ---- evaluation ----------------------------------------------------------------------------------------------


def marginal_sampler(tokens_dir: Path, num_classes: int, vocab_size: int, counts=None):
    """Product of per-position, class-conditional marginals counted over the teacher-token shards (``counts``:
    those counts when the caller already has them, so the shards are read once)."""
    import torch

    from dd2dist.eval.token_marginals import shard_token_counts

    if counts is None:
        counts = shard_token_counts(tokens_dir, num_classes, vocab_size)
    counts = counts.float()
    probs = (counts + 1e-6) / (counts + 1e-6).sum(-1, keepdim=True)

    def sample(labels, generator):
        p = probs[labels]  # (B, N, V)
        B, N, V = p.shape
        return torch.multinomial(p.reshape(B * N, V), 1, generator=generator).view(B, N)

    return sample


def evaluate_marginals(cfg, teacher, tokens_dir: Path, out_dir: Path, reference=None) -> dict:
    """The product-of-marginals baseline, measured exactly like the samplers of ``evaluate_run`` (with
    ``reference`` counts, its token-marginal TV too)."""
    import torch

    from dd2dist.digits.data import digits_split, to_uint8
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.features import digits_feature_space
    from dd2dist.eval.metrics import class_consistency, compute_metrics
    from dd2dist.eval.run_eval import balanced_labels, save_grid
    from dd2dist.eval.token_marginals import class_position_counts, marginal_tv

    classifier, _, clf_path = cached_classifier()
    n = cfg.eval.num_samples
    labels = balanced_labels(n, teacher.num_classes)
    sample = marginal_sampler(tokens_dir, teacher.num_classes, teacher.vocab_size, reference)
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 7919)
    t0 = time.perf_counter()
    ids = torch.cat([sample(labels[i : i + cfg.eval.batch_size], gen) for i in range(0, n, cfg.eval.batch_size)])
    with torch.no_grad():
        images = torch.cat([to_uint8(teacher.decode(ids[i : i + cfg.eval.batch_size]))
                            for i in range(0, n, cfg.eval.batch_size)])
    settings = {"method": "marginals", "num_samples": n, "labels": "balanced (i mod num_classes)",
                "tokens": f"independent per position from the class-conditional marginals of {tokens_dir}",
                "generation_seconds": time.perf_counter() - t0}
    res = compute_metrics(images, digits_split("heldout").uint8(), digits_feature_space(clf_path),
                          sampling=settings, batch_size=64)
    res.update(class_consistency(images, labels, classifier, teacher.num_classes))
    if reference is not None:  # drawn from the very marginals it is compared with: the finite-sample floor
        res["token_marginal_tv"] = marginal_tv(
            class_position_counts(ids, labels, teacher.num_classes, teacher.vocab_size), reference)
    res["grid"] = str(save_grid(images, out_dir / "grid_marginals.png"))
    return res


def train_vs_heldout_floor(num: int) -> dict:
    """FID of real training digits vs the held-out ones at the evaluation's sample count (the best reachable)."""
    from dd2dist.digits.data import digits_split
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.features import digits_feature_space
    from dd2dist.eval.metrics import compute_metrics

    _, info, clf_path = cached_classifier()
    train = digits_split("train").uint8()[:num]
    floor = compute_metrics(train, digits_split("heldout").uint8(), digits_feature_space(clf_path),
                            sampling={"source": f"first {train.shape[0]} train digits"})
    return {"fid": floor["fid"], "classifier_heldout_accuracy": info["heldout_accuracy"], "classifier": clf_path}


def evaluate_family(cfg, teacher, run_dir: Path, log_fn=log) -> dict:
    """``dd2dist.eval.run_eval.evaluate_run`` (teacher, stage-1, one-step, snapped, teacher-refined) plus the
    product-of-marginals baseline and the real-data floor; returns the report (``results`` per method)."""
    from dd2dist.eval.run_eval import evaluate_run
    from dd2dist.eval.token_marginals import shard_token_counts

    out_dir = run_dir / "eval"
    tokens_dir = run_dir / "tokens"
    # the teacher-token shards are the teacher's marginals: every sampler's token-marginal TV is measured from them
    reference = None
    if tokens_dir.is_dir():
        reference = shard_token_counts(tokens_dir, teacher.num_classes, teacher.vocab_size)
    report = evaluate_run(cfg, log=lambda m: log_fn(f"[{cfg.teacher.family}] {m}"), out_dir=out_dir,
                          token_reference=reference)
    for needed in ("teacher", "stage1", "one_step"):
        if needed not in report["results"]:
            raise RuntimeError(f"evaluation of {run_dir} has no {needed!r} result (missing weights?)")
    if tokens_dir.is_dir():
        report["results"]["marginals"] = res = evaluate_marginals(cfg, teacher, tokens_dir, out_dir, reference)
        log_fn(f"[{cfg.teacher.family}]   marginals: FID {res['fid']:.3f} class consistency "
               f"{res['class_consistency']:.3f}")
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    report["floor"] = train_vs_heldout_floor(cfg.eval.num_samples)
    return report


# ---- figures -------------------------------------------------------------------------------------------------

GRID_METHODS = ("teacher", "stage1", "one_step", "refined_2", "marginals")
GRID_TITLES = {"teacher": "teacher (AR)", "stage1": "stage-1 model, one step", "one_step": "DD2 one-step",
               "one_step_snapped": "DD2 one-step, snapped", "one_step_compact": "DD2 one-step, compact head",
               "refined_2": "DD2 + teacher, 2 steps",
               "refined_3": "DD2 + teacher, 3 steps", "marginals": "product of marginals"}


def save_sample_figure(results: dict, path: Path, title: str, columns: int = 6) -> Path:
    """One PNG: the first ``columns`` samples of every class (rows) for each sampler, read back from the
    per-sampler grids ``evaluate_run`` writes (10 columns = classes 0..9, one sample per class per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    names = [n for n in GRID_METHODS if n in results and results[n].get("grid")]
    fig, axes = plt.subplots(1, len(names), figsize=(1.75 * len(names), 3.1), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = mpimg.imread(results[name]["grid"])  # tile rows: sample index; tile columns: class
        cell = (grid.shape[1] - 1) // 10  # save_image pads 1 pixel around each tile
        rows = min(columns, (grid.shape[0] - 1) // cell)
        tiles = grid[1 : 1 + rows * cell, 1 : 1 + 10 * cell].reshape(rows, cell, 10, cell, grid.shape[2])
        by_class = tiles.transpose(2, 1, 0, 3, 4).reshape(10 * cell, rows * cell, grid.shape[2])  # tiles moved only
        ax.imshow(by_class, interpolation="nearest")
        ax.set_title(GRID_TITLES.get(name, name), fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


LOSS_KEYS = ("student_head/loss", "student/loss", "generator/regression_loss", "guidance/loss", "generator/loss")


def loss_histories(run_id: str, tracking_uri: str) -> dict[str, list[tuple[int, float]]]:
    """The training losses of an MLflow run: {key: [(iteration, value)]}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for key in LOSS_KEYS:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if hist:
            out[key] = hist
    return out


def save_loss_curves(histories: dict[str, dict], path: Path) -> Path:
    """One PNG, one panel per family: the stage-1 GTS loss, the generator's PF-ODE regression loss (when the recipe
    has that phase), the guidance FCS loss and the generator CSD loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.2), squeeze=False)
    for ax, (family, hist) in zip(axes[0], histories.items()):
        for key, values in hist.items():
            steps, vals = zip(*values)
            ax.plot(steps, vals, label=key, lw=1, color=f"C{LOSS_KEYS.index(key)}")  # one colour per loss
        ax.set_title(f"{family}: training losses (MLflow)", fontsize=9)
        ax.set_xlabel("iteration (optimizer steps of all roles)")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- results -------------------------------------------------------------------------------------------------


def family_summary(evaluation: dict, train: dict, teacher_report: dict, cfg, seconds: float, run: dict) -> dict:
    """The flat per-family record of results.json."""
    methods = evaluation["results"]
    out: dict[str, Any] = {}
    for name, m in methods.items():
        out[f"fid_{name}"] = m["fid"]
        out[f"precision_{name}"] = m["precision"]
        out[f"recall_{name}"] = m["recall"]
        out[f"isc_{name}"] = m["isc_mean"]
        out[f"class_consistency_{name}"] = m["class_consistency"]
        if "token_marginal_tv" in m:
            out[f"token_marginal_tv_{name}"] = m["token_marginal_tv"]["mean"]
    out["fid_train_vs_heldout"] = evaluation["floor"]["fid"]
    out["fid_ratio_one_step"] = methods["one_step"]["fid"] / max(methods["teacher"]["fid"], 1e-12)
    out["class_consistency_gap"] = abs(methods["one_step"]["class_consistency"]
                                       - methods["teacher"]["class_consistency"])
    # one standard error of that difference (independent binomial fractions): how much of the gap is sampling noise
    out["class_consistency_gap_se"] = math.hypot(methods["one_step"].get("class_consistency_se", 0.0),
                                                 methods["teacher"].get("class_consistency_se", 0.0))
    out["targets"] = {
        "fid_ratio_max": FID_RATIO_TARGET, "fid_ratio_met": out["fid_ratio_one_step"] <= FID_RATIO_TARGET,
        "class_consistency_gap_max": CONSISTENCY_GAP_TARGET,
        "class_consistency_met": out["class_consistency_gap"] <= CONSISTENCY_GAP_TARGET,
    }
    if "one_step_compact" in methods:  # the same generator with its compact sampling head, on the same noise
        compact = methods["one_step_compact"]
        out["fid_ratio_one_step_compact"] = compact["fid"] / max(methods["teacher"]["fid"], 1e-12)
        out["class_consistency_gap_compact"] = abs(compact["class_consistency"]
                                                   - methods["teacher"]["class_consistency"])
        out["targets"]["fid_ratio_met_compact"] = out["fid_ratio_one_step_compact"] <= FID_RATIO_TARGET
        out["targets"]["class_consistency_met_compact"] = (out["class_consistency_gap_compact"]
                                                           <= CONSISTENCY_GAP_TARGET)
    out["classifier_heldout_accuracy"] = evaluation["floor"]["classifier_heldout_accuracy"]
    out["seconds"] = seconds
    out["seconds_by_step"] = run["seconds_by_step"]
    out["timing_source"] = run.get("timing_source", "measured in this run")
    out["sampling"] = {
        "teacher": asdict(cfg.teacher.sampling), "num_samples": cfg.eval.num_samples,
        "per_class": cfg.eval.num_samples // cfg.teacher.arch.num_classes,
        "reference": "digits held-out split (359 images)", "feature_space": "digits classifier (penultimate)",
        "methods": {name: m["sampling"] for name, m in methods.items()},
    }
    out["teacher"] = {"checkpoint": teacher_report["checkpoint"], "reused": teacher_report.get("reused", False),
                      "training_seconds": teacher_report.get("seconds")}
    out["token_shards"] = run["token_shards"]
    out["mlflow"] = run["mlflow"]
    out["export"] = train["stage2"]["export"]
    out["stage1_model"] = train["stage1_file"]
    out["iterations"] = train["stage2"]["iteration"]
    out["grid"] = run["grid"]
    out["metrics"] = methods
    out["feature_space"] = evaluation["feature_space"]
    return out


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(results: dict) -> str:
    """The quality table (one block per family) and the per-step timings, as Markdown."""
    lines = ["| family | sampler | FID | precision | recall | IS | class consistency | token-marginal TV |",
             "|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        if family not in results:
            continue
        r = results[family]
        for name, m in r["metrics"].items():
            lines.append(f"| {family} | {GRID_TITLES.get(name, name)} | {_fmt(m['fid'])} | {_fmt(m['precision'])} | "
                         f"{_fmt(m['recall'])} | {_fmt(m['isc_mean'], 2)} | {_fmt(m['class_consistency'])} | "
                         f"{_fmt(m.get('token_marginal_tv', {}).get('mean'))} |")
        lines.append(f"| {family} | *train digits vs held-out (floor)* | {_fmt(r['fid_train_vs_heldout'])} "
                     "| | | | | |")
    lines += ["", "| family | teacher | teacher tokens | stage 1 | stage 2 | compact head | evaluation | total (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        if family in results:
            s = results[family]["seconds_by_step"]
            lines.append(f"| {family} | {s['teacher']:.0f}{' (reused)' if results[family]['teacher']['reused'] else ''}"
                         f" | {s['tokens']:.0f} | {s['stage1']:.0f} | {s['stage2']:.0f} | "
                         f"{_fmt(s.get('compact_head'), 0)} | {s['evaluation']:.0f} | "
                         f"{results[family]['seconds']:.0f} |")
    settings = results.get("settings", {})
    if settings.get("seconds_teachers_concurrent") is not None:
        together, total = settings["seconds_teachers_concurrent"], settings["seconds_total"]
        lines += ["", f"The teachers were trained at once (one CPU each): {together:.0f} s of wall time for the "
                  f"teacher column together; the whole demo took {total:.0f} s."]
    return "\n".join(lines) + "\n"


def print_summary(results: dict) -> None:
    print("\n" + markdown_tables(results))
    for family in FAMILIES:
        if family not in results:
            continue
        r = results[family]
        print(f"{family}: one-step FID / teacher FID = {r['fid_ratio_one_step']:.2f} (target <= {FID_RATIO_TARGET}); "
              f"class-consistency gap {r['class_consistency_gap']:.3f} +- {r['class_consistency_gap_se']:.3f} "
              f"(1 s.e.; target <= {CONSISTENCY_GAP_TARGET})")
        if "fid_ratio_one_step_compact" in r:
            print(f"  with the compact sampling head: FID ratio {r['fid_ratio_one_step_compact']:.2f}, "
                  f"class-consistency gap {r['class_consistency_gap_compact']:.3f}")
        print(f"  MLflow run {r['mlflow']['run_id']} in {r['mlflow']['tracking_uri']}")
        print(f"  sample grid {r['grid']}   generator {r['export']}")
    sys.stdout.flush()


# ---- driver --------------------------------------------------------------------------------------------------


def _train_teacher_task(family: str, teachers_dir: str, recipe, evaluate: bool) -> dict:
    """One family's teacher, in a Ray worker (1 CPU): the report of ``train_digits_teacher``."""
    os.chdir(REPO)
    import torch

    from dd2dist.digits.teacher_job import train_digits_teacher

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report = train_digits_teacher(teacher_config(family), teachers_dir, recipe,
                                  log=lambda m: log(f"[{family}]   {m}"), evaluate=evaluate)
    return {**report, "train_seconds": time.perf_counter() - t0}


def train_teachers_concurrently(families: list[str], args: argparse.Namespace, plan: DemoPlan) -> dict[str, dict]:
    """Train (or reuse) every family's teacher at once, one Ray task of 1 CPU each.

    Teacher training is single-threaded (small convolutions and a 4-layer transformer gain little from a second
    thread), so on a 2-core machine the two teachers take the time of the slower one. The weights are the ones
    a training in this process gives: each task runs the same seeded code with one thread (OMP_NUM_THREADS=1, as
    Ray sets it for a 1-CPU task and the Makefile for the demo). ``run_family`` then finds them cached.
    """
    import ray

    task = ray.remote(num_cpus=1)(_train_teacher_task)
    log(f"teachers of {', '.join(families)}: trained (or reused) concurrently in {args.teachers}, one CPU each")
    refs = {f: task.remote(f, args.teachers, plan.teacher_recipe, not args.quick) for f in families}
    return {f: ray.get(ref) for f, ref in refs.items()}


def run_family(family: str, args: argparse.Namespace, plan: DemoPlan, trained_teacher: dict | None = None) -> dict:
    import torch

    from dd2dist.digits.teacher_job import train_digits_teacher
    from dd2dist.eval.run_eval import log_to_mlflow
    from dd2dist.teachers import build_teacher
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
        report = train_digits_teacher(teacher_config(family), args.teachers, plan.teacher_recipe,
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
                            extra=args.overrides)
        clean_run_dir(run_dir)
    torch.manual_seed(cfg.seed)
    teacher = build_teacher(cfg.teacher)

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
        cfg = family_config(family, args.quick, report["checkpoint"], run_dir, extra=args.overrides)  # shards exist
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

    log(f"[{family}] 4/5 evaluation: {cfg.eval.num_samples} samples per sampler vs the held-out digits")
    t0 = time.perf_counter()
    evaluation = evaluate_family(cfg, teacher, run_dir)
    steps["evaluation"] = time.perf_counter() - t0

    log(f"[{family}] 5/5 figures and MLflow")
    grid = save_sample_figure(evaluation["results"], run_dir / "eval" / "samples.png",
                              f"{family} digits (rows: classes 0-9)")
    run_id = log_to_mlflow(cfg, evaluation)  # eval/<method>/<metric> at the final iteration, grids, report
    tracker = open_run(cfg, progress=False)  # the same run again: the demo's own artefacts, then FINISHED
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
        summary["loss_history"] = loss_histories(tracker.run_id, tracker.tracking_uri)
        tracker.close("FINISHED")
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test size (configs/demo/*_quick.yaml)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: var,llamagen")
    parser.add_argument("--out", default="runs/demo", help="demo directory (results.json, one folder per family)")
    parser.add_argument("--teachers", default=None,
                        help="teacher cache directory (default: runs/teachers, or <out>/teachers with --quick)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a key of every family's recipe, e.g. --set stage2.generator_steps=600")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the students an earlier demo run trained under --out (no training)")
    args = parser.parse_args(argv)
    args.overrides = tuple(args.overrides)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        parser.error(f"--families: unknown {bad or families}; choose from {', '.join(FAMILIES)}")
    out = Path(args.out).absolute()
    args.teachers = str(Path(args.teachers or (out / "teachers" if args.quick else REPO / "runs" / "teachers"))
                        .absolute())
    for family in families:  # every config error before anything runs
        try:
            family_config(family, args.quick, None, out / family, check_paths=False, extra=args.overrides)
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
        curves = save_loss_curves(histories, out / "loss_curves.png") if any(histories.values()) else None
        import torch

        results["settings"] = {
            "quick": args.quick, "families": families, "started": started_at,
            "seconds_total": time.perf_counter() - t0, "teachers_dir": args.teachers,
            # wall time of the concurrent teacher step (each family's seconds_by_step.teacher is its own training)
            "seconds_teachers_concurrent": None if args.eval_only else seconds_teachers,
            "recipes": {f: str(recipe_path(f, args.quick).relative_to(REPO)) for f in families},
            "overrides": list(args.overrides), "eval_only": args.eval_only,
            "token_samples": plan.token_samples, "teacher_recipe": asdict(plan.teacher_recipe),
            "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "loss_curves": str(curves) if curves else None,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "results.md").write_text(markdown_tables(results))
        print_summary(results)
        print(f"results: {out / 'results.json'} (tables: {out / 'results.md'}; loss curves: {curves}); "
              f"total {results['settings']['seconds_total']:.0f} s")
    return code


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # ZeRO-3 process groups can abort at interpreter exit after the work is done (environment.md): skip finalisers.
    os._exit(exit_code)
