"""Evaluate a run of the shared layout: teacher, stage-1 model, exported one-step generator, teacher-refined k-step.

What is evaluated (each only when its weights exist, unless asked for explicitly):

* ``teacher``: the teacher's KV-cached sampler with the distillation-target sampling (``teacher.sampling``);
* ``stage1``: the stage-1 AR-diffusion student used as a one-step generator (weights from ``--stage1`` or
  ``<run>/export/stage1_student.safetensors`` / ``.pt``, or the newest stage-1 checkpoint under
  ``<run>/checkpoints``);
* ``one_step``: the exported EMA generator (``<run>/export/generator.safetensors``, or another export of the run
  named by ``generator_file``, e.g. a ``stage2.ema_compare`` EMA's), its continuous tokens decoded;
  ``one_step_snapped`` decodes their nearest codes instead;
* ``one_step_compact``: the same generator sampled with its compact head
  (``<run>/export/generator_compact_head.safetensors``, :mod:`dd2dist.nets.compact_head`), on the same noise as
  ``one_step``;
* ``refined_k``: the one-step sample with its last k-1 AR steps re-sampled by the teacher, for k in
  ``eval.refine_steps``.

Metrics: FID / IS / precision / recall through torch-fidelity (:mod:`dd2dist.eval.metrics`) in the digits
classifier space against the held-out digits, or in InceptionV3 space against ``eval.reference_npz``, plus class
consistency (held-out classifier, digits only), and with a ``token_reference`` the token-marginal TV
(:mod:`dd2dist.eval.token_marginals`). Labels are class-balanced; sample i of a method uses seed
``seed_base + i`` for its noise (one-step: exact per sample; teacher sampling: one generator per batch, seeded by
its first index). Every number is stored with its sampling settings.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dd2dist.conditions import Cond, cyclic_labels
from dd2dist.data.digits import NUM_CLASSES, to_uint8
from dd2dist.nets.compact_head import COMPACT_HEAD_FILE, load_compact_head
from dd2dist.teachers.base import ARTeacher

METHODS = ("teacher", "stage1", "one_step", "one_step_snapped", "one_step_compact", "refined")
STAGE1_EXPORTS = ("stage1_student.safetensors", "stage1_student.pt")


def per_sample_noise(num: int, shape: tuple[int, ...], seed_base: int, start: int = 0) -> Tensor:
    """Noise of samples start..start+num-1, sample i drawn from its own generator seeded ``seed_base + i``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_base + start + i))
                        for i in range(num)])


def load_student_weights(path: str | Path) -> dict[str, Tensor]:
    """A StudentNet state dict from a ``.safetensors`` / ``.pt`` file or a checkpoint step directory.

    Step directories hold the engine of the stage-1 student: ``engines/student/module.pt`` (plain-torch engine)
    or ``engines/student/engine`` (DeepSpeed; consolidated with DeepSpeed's zero_to_fp32 for ZeRO 1-3). A step
    directory is read only when it verifies against its manifest (dd2dist.train.manifest).
    """
    path = Path(path)
    if path.is_dir():
        from dd2dist.train.manifest import require_verified

        require_verified(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("student", state) if isinstance(state, dict) else state
    eng = path / "engines" / "student"
    if (eng / "module.pt").is_file():
        return torch.load(eng / "module.pt", map_location="cpu", weights_only=True)
    if (eng / "engine").is_dir():
        model_states = sorted((eng / "engine").glob("*model_states.pt"))
        if list((eng / "engine").glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(eng), tag="engine")
        if model_states:
            return torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    raise FileNotFoundError(f"no stage-1 student weights at {path} (expected a .safetensors/.pt file or a "
                            "checkpoint directory with engines/student/)")


def find_stage1_weights(run_dir: Path) -> Path | None:
    """The exported stage-1 student, else the newest checkpoint whose engines are the stage-1 student."""
    for name in STAGE1_EXPORTS:
        if (run_dir / "export" / name).is_file():
            return run_dir / "export" / name
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for step in sorted(root.iterdir(), reverse=True):
        state = step / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("engine_group") == "stage1":
            return step
    return None


@torch.no_grad()
def _generate(method: str, n: int, labels: Tensor, teacher: ARTeacher, nets: dict, cfg, seed_base: int,
              batch_size: int, k: int = 0) -> tuple[Tensor, Tensor]:
    """(uint8 images (n, 3, H, W), token ids (n, N)) of one method, in batches; the ids of a continuous sampler
    are the nearest codes of its output (what ``one_step_snapped`` decodes)."""
    from dd2dist.eval.sampling import teacher_refined

    images, tokens = [], []
    for start in range(0, n, batch_size):
        y = labels[start : start + batch_size]
        cond = Cond(labels=y)
        b = y.shape[0]
        if method == "teacher":
            gen = torch.Generator().manual_seed(seed_base + start)
            ids = teacher.sample(cond, cfg.teacher.sampling, generator=gen)
            x = teacher.decode(ids)
        elif method == "refined":
            eps_gen = torch.Generator().manual_seed(seed_base + start)
            _, ids = teacher_refined(nets["one_step"], teacher, cond, k, cfg.teacher.sampling, eps_gen)
            x = teacher.decode(ids)
        else:
            net = nets[method if method in ("stage1", "one_step_compact") else "one_step"]
            eps = per_sample_noise(b, (teacher.num_tokens, teacher.embed_dim), seed_base, start)
            q = net.generate(eps, cond).float()
            ids = teacher.quantize(q)
            x = teacher.decode(ids if method == "one_step_snapped" else q)
        images.append(to_uint8(x))
        tokens.append(ids.cpu())
    return torch.cat(images), torch.cat(tokens)


def save_grid(images: Tensor, path: Path, nrow: int = 10) -> Path:
    """A PNG grid of uint8 images (first rows of each class when labels are balanced)."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images[: nrow * nrow].float() / 255.0, str(path), nrow=nrow, padding=1)
    return path


def evaluate_run(
    cfg: Any,
    methods: tuple[str, ...] | None = None,
    num_samples: int | None = None,
    stage1: str | None = None,
    space_kind: str = "auto",
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    token_reference: Tensor | None = None,
    generator_file: str = "generator.safetensors",
) -> dict:
    """Evaluate the run of ``cfg`` (its ``output_dir``); returns the JSON-ready report (also written to
    ``<out_dir>/report.json`` with sample grids next to it).

    ``token_reference``: per-(class, position) code counts of the teacher's tokens
    (:func:`dd2dist.eval.token_marginals.class_position_counts`, e.g. over the teacher-token shards); with it every
    method also gets ``token_marginal_tv``, the total variation of its token marginals from those.
    """
    from dd2dist.eval.metrics import class_consistency, compute_metrics
    from dd2dist.eval.token_marginals import class_position_counts, marginal_tv
    from dd2dist.nets.student import StudentNet
    from dd2dist.teachers import build_seeded_teacher

    run_dir = Path(cfg.output_dir)
    out = Path(out_dir) if out_dir else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()  # the same weights the training workers built
    n = int(num_samples or cfg.eval.num_samples)
    labels = cyclic_labels(n, teacher.num_classes)
    nets: dict[str, Any] = {}
    export = run_dir / "export" / generator_file
    compact_file = run_dir / "export" / COMPACT_HEAD_FILE
    stage1_path = Path(stage1) if stage1 else find_stage1_weights(run_dir)
    wanted = methods or tuple(m for m in METHODS if (
        m == "teacher" or (m == "stage1" and stage1_path is not None)
        or (m in ("one_step", "one_step_snapped") and export.is_file())
        or (m == "one_step_compact" and export.is_file() and compact_file.is_file())
        or (m == "refined" and export.is_file() and cfg.eval.refine_steps)))
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown evaluation method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "refined" in wanted and not cfg.eval.refine_steps:
        raise ValueError("method 'refined' needs eval.refine_steps, e.g. --set 'eval.refine_steps=[2, 3]'")
    if any(m in ("one_step", "one_step_snapped", "one_step_compact", "refined") for m in wanted):
        from dd2dist.eval.sampling import load_generator

        if not export.is_file():
            raise FileNotFoundError(f"no exported generator at {export} (jobs/distill.py writes it after stage 2)")
        net, _ = load_generator(export.parent, weights_file=generator_file)
        nets["one_step"] = net.for_sampling()
        if "one_step_compact" in wanted:
            if not compact_file.is_file():
                raise FileNotFoundError(f"no compact head at {compact_file} (jobs/compact_head.py fits one)")
            compact = load_compact_head(compact_file)
            nets["one_step_compact"] = net.for_sampling(compact.folded())
            compact_spec = compact.spec.to_metadata()
    if "stage1" in wanted:
        if stage1_path is None:
            raise FileNotFoundError(f"no stage-1 weights under {run_dir} (pass --stage1 FILE_OR_CHECKPOINT_DIR)")
        net = StudentNet(teacher, cfg.student, init_adapter=False)
        net.load_state_dict(load_student_weights(stage1_path))
        nets["stage1"] = net.eval().requires_grad_(False).for_sampling()

    space, reference, classifier = teacher_feature_space(cfg, teacher, space_kind)
    seed_base = int(cfg.seed) * 1_000_003 + 7919  # fixed, documented seed range per run seed
    results: dict[str, Any] = {}
    jobs = [(m, 0) for m in wanted if m != "refined"] + [("refined", k) for k in cfg.eval.refine_steps
                                                         if "refined" in wanted]
    for method, k in jobs:
        name = f"refined_{k}" if method == "refined" else method
        t0 = time.perf_counter()
        images, ids = _generate(method, n, labels, teacher, nets, cfg, seed_base, cfg.eval.batch_size, k)
        seconds = time.perf_counter() - t0
        settings = {"method": name, "num_samples": n, "labels": "balanced (i mod num_classes)",
                    "seed_range": [seed_base, seed_base + n], "batch_size": cfg.eval.batch_size,
                    "generation_seconds": seconds}
        if method in ("teacher", "refined"):
            settings["teacher_sampling"] = _sampling_dict(cfg.teacher.sampling)
        if method == "refined":
            settings["refine_steps"] = k
        if method in ("one_step", "one_step_snapped", "one_step_compact", "refined"):
            settings["generator"] = str(export)
        if method == "one_step_compact":
            settings["compact_head"] = {"file": str(compact_file), **compact_spec}
        if method in ("one_step", "stage1", "one_step_compact"):
            settings["tokens"] = "continuous generator output, decoded as is"
        if method == "one_step_snapped":
            settings["tokens"] = "nearest codes of the generator output"
        res = compute_metrics(images, reference, space, sampling=settings, batch_size=64)
        if classifier is not None and teacher.num_classes == NUM_CLASSES:  # labels to be consistent with
            res.update(class_consistency(images, labels, classifier, teacher.num_classes))
        if token_reference is not None:
            counts = class_position_counts(ids, labels, teacher.num_classes, teacher.vocab_size)
            res["token_marginal_tv"] = marginal_tv(counts, token_reference)
        res["grid"] = str(save_grid(images, out / f"grid_{name}.png"))
        results[name] = res
        log(f"  {name}: FID {res['fid']:.3f}" + (f" class consistency {res['class_consistency']:.3f}"
                                                 if "class_consistency" in res else "")
            + (f" token-marginal TV {res['token_marginal_tv']['mean']:.3f}" if "token_marginal_tv" in res else "")
            + f" ({seconds:.1f} s to generate {n})")
    report = {"run_dir": str(run_dir), "teacher": cfg.teacher.official or f"{cfg.teacher.family}(own)",
              "feature_space": space.describe(), "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    report["report_path"] = str(out / "report.json")
    return report


def _sampling_dict(sampling) -> dict:
    from dataclasses import asdict

    return asdict(sampling)


def teacher_feature_space(cfg, teacher: ARTeacher, kind: str):
    """(FeatureSpace, reference images or npz path, classifier or None) for this teacher."""
    from dd2dist.data.digits import IMAGE_SIZE, digits_split
    from dd2dist.eval.features import digits_feature_space, inception_feature_space

    if kind == "auto":
        with torch.no_grad():
            side = teacher.decode(torch.zeros(1, teacher.num_tokens, dtype=torch.long)).shape[-1]
        # the digits teachers: class-conditional or unconditional (one label)
        kind = "digits" if (teacher.num_classes in (1, NUM_CLASSES) and side == IMAGE_SIZE) else "inception"
    if kind == "digits":
        from dd2dist.eval.classifier import cached_classifier

        classifier, _, path = cached_classifier()
        return digits_feature_space(path), digits_split("heldout").uint8(), classifier
    if kind == "inception":
        if not cfg.eval.reference_npz:
            raise FileNotFoundError("eval.reference_npz is not set: InceptionV3 FID needs reference statistics or "
                                    "images (an ADM-style .npz)")
        return inception_feature_space(cfg.eval.inception_weights), cfg.eval.reference_npz, None
    raise ValueError(f"feature space must be auto, digits or inception, got {kind!r}")


def _run_iteration(run_dir: Path) -> int:
    """The training iteration of the newest complete checkpoint (the step the eval metrics are logged at)."""
    from dd2dist.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if latest is None:
        return 0
    return int(json.loads((latest / ckpt.STATE_FILE).read_text()).get("iteration", 0))


def log_to_mlflow(cfg, report: dict) -> str | None:
    """Log every number as ``eval/<method>/<metric>`` and the report + grids as artefacts, in the run's MLflow
    run (continued from ``<run>/mlflow_run.json`` when present); returns the run id (None if tracking is off)."""
    from dd2dist.tracking import open_run

    tracker = open_run(cfg)
    if tracker is None:
        return None
    try:
        metrics = {}
        for method, res in report["results"].items():
            for key in ("fid", "isc_mean", "precision", "recall", "class_consistency"):
                value = res.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    metrics[f"eval/{method}/{key}"] = float(value)
            if "token_marginal_tv" in res:
                metrics[f"eval/{method}/token_marginal_tv"] = float(res["token_marginal_tv"]["mean"])
        tracker.log_metrics(metrics, step=_run_iteration(Path(cfg.output_dir)))
        tracker.log_artifact(report["report_path"], "eval")
        for res in report["results"].values():
            tracker.log_artifact(res["grid"], "eval")
    finally:
        tracker.close()
    return tracker.run_id
