"""The text-to-image demo (``python jobs/demo.py --t2i``): captions to a one-step generator, end to end.

    captioned digits (class + properties measured from the pixels, several phrasings, some held out)
      -> the small text-conditional LlamaGen digits teacher (trained or reused, cached by config hash)
      -> caption features across Ray actors (``dd2dist.pipelines.caption_features``) into caption shards
      -> teacher-token shards conditioned on those captions (``dd2dist.pipelines.teacher_tokens``)
      -> stage 1 + stage 2 in one Ray Train launch with 2 DeepSpeed workers (stage 2 draws its captions from
         the caption bank of the shards)
      -> evaluation per prompt against the teacher's own samples (``dd2dist.eval.t2i_fidelity``): FID to the
         teacher with its floor, prompt adherence on seen and held-out phrasings
      -> MLflow, ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dd2dist.demo.pipeline import REPO, clean_run_dir, log, train_students
from dd2dist.machine import describe_machine

FAMILY = "llamagen"
TEACHER_CONFIG = REPO / "configs" / "teachers" / "digits_llamagen_t2i.yaml"
# what results.json carries per sampler (the prompt-adherence and fidelity figures), and their MLflow names
HEADLINE = ("prompt_class_accuracy_seen", "prompt_class_accuracy_heldout", "prompt_property_agreement_seen",
            "prompt_all_correct_seen", "prompt_all_correct_heldout",
            "prompt_property_agreement_heldout", "fid_to_teacher", "dependence_captured",
            "dependence_captured_pair_tv", "pair_tv", "token_marginal_tv", "precision", "recall")
TARGET_ADHERENCE_GAP = 0.05  # one-step prompt adherence within this of the teacher's, seen and held-out
TARGET_DEPENDENCE = 0.7


@dataclass(frozen=True)
class T2IPlan:
    """Sizes of the text-to-image demo that are not part of an experiment config."""

    teacher_recipe: Any  # dd2dist.digits.recipe.TeacherRecipe
    captions_per_image: int  # training phrasings per train digit (the caption pool of the shards and stage 2)
    token_samples: int  # teacher-token shard samples (sample i on caption i mod M); 0 = one per training caption
    prompts_per_combo: int  # evaluation prompts per class x property combination, per phrasing kind
    token_workers: int = 2
    token_batch: int = 256
    encode_workers: int = 2


def t2i_plan(quick: bool) -> T2IPlan:
    from dd2dist.digits.recipe import FULL_T2I, QUICK

    if quick:
        return T2IPlan(QUICK, captions_per_image=1, token_samples=64,
                       prompts_per_combo=1, token_batch=16)
    return T2IPlan(FULL_T2I, captions_per_image=3, token_samples=0, prompts_per_combo=25)


def recipe_path(quick: bool) -> Path:
    return REPO / "configs" / "demo" / f"{'smoke_' if quick else ''}llamagen_t2i.yaml"


def t2i_config(quick: bool, teacher_ckpt: str | None, run_dir: Path, check_paths: bool = True,
               extra: tuple[str, ...] = ()):
    """The distillation config with the demo's paths: the teacher, the token shards, the caption shards."""
    from dd2dist.config import load_config

    overrides = [*extra, f"output_dir={run_dir}", "data.source=shards", f"data.shards={run_dir / 'tokens'}",
                 f"data.captions={run_dir / 'captions'}"]
    if teacher_ckpt:
        overrides.append(f"teacher.checkpoint={teacher_ckpt}")
    cfg = load_config(recipe_path(quick), overrides, check_paths=check_paths)
    if cfg.teacher.family != FAMILY or not cfg.teacher.llamagen.caption_dim:
        raise ValueError(f"{recipe_path(quick)}: the text-to-image demo needs a text-conditional llamagen teacher")
    return cfg


def encode_records(records: list[dict], encoder: str, out_dir: Path, workers: int) -> Any:
    """Caption shards of ``records`` (reused when complete and identical), read back as a CaptionSet."""
    from dd2dist.data.caption_shards import read_caption_shards
    from dd2dist.pipelines.caption_features import encode_captions

    encode_captions(records, encoder, out_dir, workers=workers)
    return read_caption_shards(out_dir)


def prompts_from(captions) -> Any:
    """The evaluation prompts (:class:`dd2dist.eval.t2i_fidelity.Prompts`) of a caption set."""
    import torch

    from dd2dist.eval.t2i_fidelity import Prompts

    idx = torch.arange(len(captions.keys))
    return Prompts(cond=captions.cond(idx),
                   classes=torch.tensor([int(i["class"]) for i in captions.info], dtype=torch.long),
                   heldout=torch.tensor([bool(i["heldout"]) for i in captions.info], dtype=torch.bool),
                   records=[{**i, "caption": c} for i, c in zip(captions.info, captions.captions)])


def adherence_scorer(bins):
    """The prompt-adherence callable of the evaluation: digits classifier + the teacher's property bins."""
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.prompt_adherence import prompt_adherence

    classifier, _, _ = cached_classifier()

    def score(images, records):
        raw = prompt_adherence(images, records, classifier, bins)
        out = {"prompt_class_accuracy": raw["class_accuracy"],
               "prompt_property_agreement": raw["property_agreement_mean"], "prompt_all_correct": raw["all_correct"],
               "num_prompts": raw["num_images"]}
        out.update({f"prompt_property_agreement_{p}": v for p, v in raw["property_agreement"].items()})
        return out

    return score


def log_t2i_evaluation(cfg, report: dict, step: int) -> str | None:
    """Every headline figure as ``eval/<sampler>/<metric>`` and the report as an artefact, in the run's MLflow run."""
    from dd2dist.tracking import open_run

    tracker = open_run(cfg)
    if tracker is None:
        return None
    try:
        metrics = {f"eval/{name}/{key}": float(res[key]) for name, res in report["samplers"].items()
                   for key in HEADLINE if isinstance(res.get(key), (int, float)) and math.isfinite(res[key])}
        tracker.log_metrics(metrics, step=step)
        tracker.log_artifact(report["report_path"], "eval")
        tracker.set_tags({"demo": "t2i"})
    finally:
        tracker.close("FINISHED")
    return tracker.run_id


def verdict(report: dict) -> dict:
    """Targets of the text-to-image demo, met or not, with the figures they compare.

    Adherence is compared with the teacher's reference draw in both directions: a distilled generator that follows
    the prompts *better* than its teacher is not reproducing the teacher either (a mode-seeking generator can
    sharpen an uncertain teacher's choice of class), so the target is |one-step - teacher| <= 0.05.
    """
    s = report["samplers"]
    out: dict[str, Any] = {}
    if "one_step" in s and "reference" in s:
        for kind in ("seen", "heldout"):
            key = f"prompt_class_accuracy_{kind}"
            diff = s["one_step"].get(key, math.nan) - s["reference"].get(key, math.nan)
            out[f"class_accuracy_one_step_minus_teacher_{kind}"] = diff
            out[f"class_accuracy_within_{TARGET_ADHERENCE_GAP}_{kind}"] = bool(abs(diff) <= TARGET_ADHERENCE_GAP)
            if "teacher" in s:  # the same figure for a second teacher draw: how far two teacher draws differ
                out[f"class_accuracy_teacher_draws_differ_{kind}"] = s["teacher"].get(key, math.nan) - s[
                    "reference"].get(key, math.nan)
        dep = s["one_step"].get("dependence_captured", math.nan)
        out["dependence_captured"] = dep
        out[f"dependence_captured_at_least_{TARGET_DEPENDENCE}"] = bool(dep >= TARGET_DEPENDENCE)
    return out


def markdown(results: dict) -> str:
    rows = ["| sampler | class acc. seen | class acc. held-out | property agr. seen | property agr. held-out | "
            "FID to teacher | dependence captured |", "|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.3f}"

    for name, r in results["samplers"].items():
        rows.append(f"| {name} | {f(r.get('prompt_class_accuracy_seen'))} | {f(r.get('prompt_class_accuracy_heldout'))}"
                    f" | {f(r.get('prompt_property_agreement_seen'))} | {f(r.get('prompt_property_agreement_heldout'))}"
                    f" | {f(r.get('fid_to_teacher'))} | {f(r.get('dependence_captured'))} |")
    return "\n".join(rows) + "\n"


def run_t2i_demo(quick: bool, out: str, teachers: str | None, overrides: tuple[str, ...] = ()) -> int:
    """Run the text-to-image demo; the exit code: 0 done, 2 the recipe does not load, 1 a step failed."""
    out_dir = Path(out).absolute()
    run_dir = out_dir / FAMILY
    teachers_dir = Path(teachers or (out_dir / "teachers" if quick else REPO / "runs" / "teachers")).absolute()
    try:
        t2i_config(quick, None, run_dir, check_paths=False, extra=overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"demo --t2i: configuration error: {err}", file=sys.stderr)
        return 2
    os.chdir(REPO)
    plan = t2i_plan(quick)
    from dd2dist.launch.ray_env import init_local_ray

    t_start = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    owns_ray = init_local_ray(num_cpus=2)
    try:
        results = _run(quick, plan, run_dir, teachers_dir, overrides)
    except Exception as err:  # noqa: BLE001 - report which stage failed, then exit non-zero
        import traceback

        traceback.print_exc()
        print(f"demo --t2i: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if owns_ray:
            import ray

            ray.shutdown()

    results["settings"] = {
        "quick": quick, "started": started_at, "seconds_total": time.perf_counter() - t_start,
        "recipe": str(recipe_path(quick).relative_to(REPO)), "teacher_config": str(TEACHER_CONFIG.relative_to(REPO)),
        "overrides": list(overrides), "plan": {k: v for k, v in asdict(plan).items() if k != "teacher_recipe"},
        "teacher_recipe": asdict(plan.teacher_recipe), "teachers_dir": str(teachers_dir),
        "machine": describe_machine(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(results))
    print("\n" + markdown(results))
    print(json.dumps(results["verdict"], indent=1))
    print(f"results: {out_dir / 'results.json'}; total {results['settings']['seconds_total']:.0f} s", flush=True)
    return 0


def _run(quick: bool, plan: T2IPlan, run_dir: Path, teachers_dir: Path, overrides: tuple[str, ...]) -> dict:
    import torch

    from dd2dist.config import load_config
    from dd2dist.digits.captions import caption_records, prompt_set, train_bins
    from dd2dist.digits.teacher_job import train_digits_teacher
    from dd2dist.eval.t2i_fidelity import t2i_fidelity
    from dd2dist.pipelines.caption_features import encode_captions
    from dd2dist.pipelines.teacher_tokens import precompute_teacher_tokens

    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    log("[t2i] 1/5 text-conditional digits teacher (train or reuse) in " + str(teachers_dir))
    teacher_cfg = load_config(TEACHER_CONFIG)
    report = train_digits_teacher(teacher_cfg, teachers_dir, plan.teacher_recipe, log=lambda m: log(f"[t2i]   {m}"),
                                  evaluate=not quick)
    steps["teacher"] = time.perf_counter() - t0
    cfg = t2i_config(quick, report["checkpoint"], run_dir, check_paths=False, extra=overrides)
    clean_run_dir(run_dir)
    encoder = cfg.teacher.text_encoder

    t0 = time.perf_counter()
    log(f"[t2i] 2/5 caption features ({encoder}) on {plan.encode_workers} Ray actors")
    # caption_records keys name the image; each of its captions needs a key of its own (zero-padded: key order)
    train_records = [{**r, "image": r["key"], "key": f"{r['key']}-{j % plan.captions_per_image}"}
                     for j, r in enumerate(caption_records("train", seed=cfg.seed,
                                                           per_image=plan.captions_per_image))]
    encode_captions(train_records, encoder, run_dir / "captions", workers=plan.encode_workers)  # read by training
    prompt_records = [{**r, "key": f"{kind}-{i:05d}"} for kind in ("seen", "heldout")
                      for i, r in enumerate(prompt_set(kind, per_combo=plan.prompts_per_combo, seed=cfg.seed))]
    prompts = prompts_from(encode_records(prompt_records, encoder, run_dir / "prompts", plan.encode_workers))
    token_samples = plan.token_samples or len(train_records)  # 0: one teacher sample per training caption
    shard_size = max(1, math.ceil(token_samples / (2 * plan.token_workers)))
    log(f"[t2i]   teacher-token shards: {token_samples} samples conditioned on {len(train_records)} captions")
    manifest = precompute_teacher_tokens(cfg, token_samples, run_dir / "tokens", workers=plan.token_workers,
                                         batch_size=plan.token_batch, shard_size=shard_size,
                                         captions=str(run_dir / "captions"))
    steps["captions_and_tokens"] = time.perf_counter() - t0
    cfg = t2i_config(quick, report["checkpoint"], run_dir, extra=overrides)  # the shards exist now

    log(f"[t2i] 3/5 stage 1 + stage 2 on Ray Train, {cfg.launch.num_workers} {cfg.engine.kind} workers")
    train = train_students(cfg, run_dir)
    steps["stage1"], steps["stage2"] = train["seconds_stage1"], train["seconds_stage2"]
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    t0 = time.perf_counter()
    log(f"[t2i] 4/5 evaluation: {prompts.classes.shape[0]} prompts ({int(prompts.heldout.sum())} with held-out "
        "phrasings) per sampler, against an independent teacher draw")
    # the property thresholds the captions were made with (fitted on the train split)
    evaluation = t2i_fidelity(run_dir, prompts, adherence_scorer(train_bins()), batch_size=cfg.eval.batch_size,
                              log=lambda m: log(f"[t2i] {m}"))
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    evaluation["report_path"] = str(eval_dir / "report.json")
    (eval_dir / "report.json").write_text(json.dumps(evaluation, indent=1, default=str))
    steps["evaluation"] = time.perf_counter() - t0

    log("[t2i] 5/5 MLflow")
    run_id = log_t2i_evaluation(cfg, evaluation, step=train["stage2"]["iteration"])
    # the headline figures and every prompt-adherence figure (per property too) of each sampler
    samplers = {name: {k: v for k, v in res.items() if k in HEADLINE or k.startswith("prompt_")}
                for name, res in evaluation["samplers"].items()}
    return {
        "samplers": samplers,
        "floor": {"fid_to_teacher": evaluation["floor_fid"],
                  "what": "a second, independent teacher draw on the same prompts (the 'teacher' sampler)"},
        "verdict": verdict(evaluation),
        "teacher": {"checkpoint": report["checkpoint"], "reused": report.get("reused"),
                    "quality": report.get("quality")},
        "prompts": {"num": evaluation["num_prompts"], "heldout": evaluation["num_heldout_prompts"]},
        "token_shards": {"dir": str(run_dir / "tokens"), "num_samples": manifest["num_samples"]},
        "seconds_by_step": steps, "mlflow_run_id": run_id, "report": evaluation["report_path"],
        "iteration": train["stage2"]["iteration"],
    }

