"""Train (or reuse) a small digits teacher of one family, end to end on the real data path, and report its quality.

    digits train split -> PNG WebDataset shards (dd2dist.data.image_shards)
      -> tokenizer training (dd2dist.digits.vq_training) on the same uint8 images
      -> DALI decode + the trained tokenizer's encoder (dd2dist.pipelines.tokenize_images) -> token shards
      -> AR cross-entropy training on those token ids (dd2dist.digits.ar_training), conditioned on the class, on
         one label for every digit (an unconditional teacher, num_classes 1) or, for a text-to-image teacher, on
         true captions of each image (dd2dist.digits.captions)
      -> checkpoint {"teacher": state_dict}, loadable by dd2dist.teachers.build_teacher (teacher.checkpoint)
      -> quality: teacher samples vs the held-out split (FID / IS / PR in the digits-classifier space, class
         consistency, or for an unconditional teacher the mix of digits it draws; prompt adherence for a text
         teacher), next to the real-data references.

A text teacher shares the tokenizer of its class-conditional counterpart (dd2dist.digits.text_teacher).

Cached by the hash of what determines the weights (teacher architecture, recipe, seed, split): a rerun with the
same inputs returns the stored report without training. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from dd2dist.conditions import Cond, Sampling, class_major_labels
from dd2dist.config import dump_yaml, fingerprint, to_dict
from dd2dist.data.digits import NUM_CLASSES, SPLIT_SEED, digits_split, to_uint8
from dd2dist.digits import text_teacher
from dd2dist.digits.ar_training import train_ar
from dd2dist.digits.caption_batches import caption_batches
from dd2dist.digits.recipe import TeacherRecipe
from dd2dist.digits.vq_training import reconstruction_mse, train_tokenizer
from dd2dist.teachers import build_family, build_teacher
from dd2dist.teachers.base import ARTeacher

CACHE_VERSION = 1  # bump when the training code changes what a given config produces


def cache_key(cfg: Any, recipe: TeacherRecipe) -> str:
    """Hash of everything that determines the trained weights: the architecture, the training recipe, the seed and
    the split. Not output paths or the run name, and not the sampling setting, the compute dtype or the size of
    the quality evaluation, which change only the report (it is redone on reuse when they change)."""
    teacher = to_dict(replace(cfg.teacher, checkpoint=None, sampling=Sampling(), dtype="float32"))
    if teacher["text_encoder"] is None:
        del teacher["text_encoder"]  # the class-conditional keys predate the field: their cached teachers stay valid
    del teacher["random_init"]  # what a missing checkpoint means at launch, not a property of trained weights
    training = {k: v for k, v in asdict(recipe).items() if k != "eval_per_class"}
    inputs = {"teacher": teacher, "recipe": training, "seed": cfg.seed, "split_seed": SPLIT_SEED,
              "version": CACHE_VERSION}
    if text_teacher.is_text_teacher(cfg):
        inputs["captions"] = text_teacher.caption_settings()
    return fingerprint(inputs)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _quantised(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images as they come back from 8-bit PNGs: the tokenizer trains on what DALI will feed it."""
    return to_uint8(images).float() / 127.5 - 1.0


def _tokenise_through_dali(cfg: Any, tokenizer_ckpt: Path, train_uint8: torch.Tensor, labels: torch.Tensor,
                           work: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PNG shards -> DALI -> trained tokenizer -> token shards; returns (ids, labels) read back from the shards."""
    from dd2dist.data import DataStats
    from dd2dist.data.image_shards import write_image_shards
    from dd2dist.data.stream import list_shards
    from dd2dist.data.tario import iter_shard_samples
    from dd2dist.pipelines.tokenize_images import tokenize_images

    img_dir, tok_dir = work / "images", work / "tokens"
    for d in (img_dir, tok_dir):
        shutil.rmtree(d, ignore_errors=True)
    hwc = train_uint8.permute(0, 2, 3, 1).numpy()
    write_image_shards(img_dir, hwc, labels.numpy(), fmt="png", per_shard=1000, prefix="digits")
    tok_cfg = replace(cfg, teacher=replace(cfg.teacher, checkpoint=str(tokenizer_ckpt)))
    summary = tokenize_images(tok_cfg, str(img_dir), tok_dir, batch_size=128, num_threads=1, device="cpu")
    stats = DataStats()
    ids, ys = [], []
    for shard in list_shards(str(tok_dir)):
        for s in iter_shard_samples(shard, stats):
            ids.append(torch.as_tensor(s.tokens, dtype=torch.long))
            ys.append(int(s.label))
    if len(ids) != train_uint8.shape[0]:
        raise RuntimeError(f"token shards in {tok_dir} hold {len(ids)} samples, expected {train_uint8.shape[0]}")
    return torch.stack(ids), torch.tensor(ys), summary


@torch.no_grad()
def sample_teacher_images(
    teacher: ARTeacher, per_class: int, sampling: Sampling, seed: int, batch_size: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class, decoded: (uint8 images (N, 3, H, W), requested labels (N,))."""
    labels = class_major_labels(teacher.num_classes, per_class)
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, labels.shape[0], batch_size):
        y = labels[i : i + batch_size]
        ids = teacher.sample(Cond(labels=y), sampling, generator=gen)
        images.append(to_uint8(teacher.decode(ids)))
    return torch.cat(images), labels


def evaluate_teacher(teacher: ARTeacher, sampling: Sampling, per_class: int, seed: int) -> dict:
    """FID / IS / PR (digits-classifier space) of teacher samples vs held-out digits, class consistency, and the
    real-data references measured the same way."""
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.features import digits_feature_space
    from dd2dist.eval.metrics import class_consistency, class_mix_tv, compute_metrics, predicted_class_mix

    classifier, clf_info, clf_path = cached_classifier()
    space = digits_feature_space(clf_path)
    held = digits_split("heldout")
    ref = held.uint8()
    # as many images for an unconditional teacher as for a class teacher: per_class of each of the ten digits
    per_label = per_class * NUM_CLASSES // teacher.num_classes
    images, labels = sample_teacher_images(teacher, per_label, sampling, seed)
    settings = {**asdict(sampling), "per_class": per_class, "seed": seed, "sampler": "teacher KV-cached AR"}
    quality = compute_metrics(images, ref, space, sampling=settings)
    if teacher.num_classes == NUM_CLASSES:
        quality.update(class_consistency(images, labels, classifier))
    else:  # no label to be consistent with: how far the digits it draws are from the data's mix of digits
        mix = predicted_class_mix(classifier.predict(images), NUM_CLASSES)
        data_mix = torch.bincount(held.labels, minlength=NUM_CLASSES).double() / len(held)
        quality.update(class_mix=mix.tolist(), class_mix_tv=class_mix_tv(mix, data_mix))
    with torch.no_grad():
        recon = to_uint8(teacher.decode(teacher.encode(_quantised(held.images))))
    train = digits_split("train")
    n_train = min(len(train), images.shape[0])
    return {
        "teacher": quality,
        "reference_train_vs_heldout": compute_metrics(train.uint8()[:n_train], ref, space,
                                                      sampling={"source": f"first {n_train} train digits"}),
        "reference_reconstructions": compute_metrics(recon, ref, space,
                                                     sampling={"source": "held-out digits encoded and decoded"}),
        "classifier": {"path": clf_path, "heldout_accuracy": clf_info["heldout_accuracy"]},
        "note": "FID / PR are in the digits-classifier space. That classifier was trained on the train split, so "
                "train digits sit further out in its feature space than unseen digits: the train-vs-heldout FID "
                "is a real-data reference, not a lower bound for generated images. Compare FIDs only at equal "
                "sample counts (here all use the same count).",
    }


def evaluate_any_teacher(teacher: ARTeacher, cfg: Any, per_class: int) -> dict:
    """The quality report of a class teacher (:func:`evaluate_teacher`) or a text teacher (prompt adherence)."""
    if text_teacher.is_text_teacher(cfg):
        from dd2dist.text import build_text_encoder

        encoder = build_text_encoder(cfg.teacher.text_encoder)
        return text_teacher.evaluate_text_teacher(teacher, encoder, cfg.teacher.sampling, per_class, cfg.seed)
    return evaluate_teacher(teacher, cfg.teacher.sampling, per_class, cfg.seed)


def _check_config(cfg: Any) -> None:
    if cfg.teacher.official:
        raise ValueError("teacher.official is set: jobs/train_teacher.py trains our own small architectures only")
    if text_teacher.is_text_teacher(cfg):
        if cfg.teacher.arch.num_classes != 0:
            raise ValueError("teacher.llamagen.num_classes must be 0 for a text-to-image teacher (caption_dim > 0), "
                             f"got {cfg.teacher.arch.num_classes}")
    elif cfg.teacher.arch.num_classes not in (1, NUM_CLASSES):
        raise ValueError(f"teacher.{cfg.teacher.family}.num_classes must be {NUM_CLASSES} for the digits (class-"
                         f"conditional) or 1 (unconditional), got {cfg.teacher.arch.num_classes}")


def training_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels a teacher of ``num_classes`` is given: 0 for every digit when unconditional (one label), else the
    digits' own (a text teacher keeps them only to match captions to images)."""
    return torch.zeros_like(labels) if num_classes == 1 else labels


# The recipe fields the tokenizer depends on (the AR fields only change the transformer).
TOKENIZER_FIELDS = ("vq_epochs", "vq_batch_size", "vq_lr", "commitment_beta", "dead_code_restart", "seed",
                    "max_train_images")


def _cached_counterpart(out: Path, base_cfg: Any, recipe: TeacherRecipe) -> Path | None:
    """A cached class-conditional teacher of ``base_cfg`` in ``out`` whose tokenizer was trained as ``recipe``
    would train it, whatever its AR settings (a text recipe may train the transformer longer): its report's
    recipe must reproduce its own cache key, so architecture, seed and split match too."""
    for report_path in sorted(out.glob("teacher-*.json")):
        try:
            rep = json.loads(report_path.read_text())
            theirs = TeacherRecipe(**rep["recipe"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, or written by an older recipe schema
        ckpt = report_path.with_suffix(".pt")
        if (rep.get("key") == cache_key(base_cfg, theirs) and ckpt.is_file()
                and all(getattr(theirs, f) == getattr(recipe, f) for f in TOKENIZER_FIELDS)):
            return ckpt
    return None


def _text_tokenizer(cfg: Any, recipe: TeacherRecipe, out: Path, train_images: torch.Tensor, work: Path,
                    log: Callable[[str], None]) -> tuple[ARTeacher, Path, Any, dict]:
    """The class-conditional counterpart holding the text teacher's tokenizer: (counterpart teacher, a checkpoint
    of it for the DALI tokenisation, its config, tokenizer info). Reused from the counterpart's cache when present,
    else trained the way the counterpart's own job trains it."""
    base_cfg = text_teacher.counterpart_config(cfg)
    base_ckpt = _cached_counterpart(out, base_cfg, recipe)
    torch.manual_seed(cfg.seed)
    base = build_family("llamagen", llamagen=base_cfg.teacher.llamagen)
    if base_ckpt is not None:
        log(f"[llamagen t2i] reusing the tokenizer of the class-conditional teacher {base_ckpt}")
        base.load_state_dict(torch.load(base_ckpt, map_location="cpu", weights_only=True)["teacher"])
        return base, base_ckpt, base_cfg, {"reused_from": str(base_ckpt)}
    log(f"[llamagen t2i] no class-conditional counterpart with this tokenizer recipe cached in {out}: training the "
        "tokenizer as that teacher's job would")
    info = train_tokenizer(base.tokenizer, train_images, recipe, log)
    tok_ckpt = work / "tokenizer_stage.pt"
    _atomic_save({"teacher": base.state_dict()}, tok_ckpt)
    return base, tok_ckpt, base_cfg, {**info, "reused_from": None}


def train_digits_teacher(
    cfg: Any, out_dir: str | os.PathLike, recipe: TeacherRecipe, log: Callable[[str], None] = print,
    evaluate: bool = True,
) -> dict:
    """Train the teacher of ``cfg.teacher`` (family + architecture) on the digits, or reuse a cached one.

    Writes ``<out>/teacher-<key>.pt`` ({"teacher": state_dict}), ``<out>/teacher-<key>.json`` (the report) and
    ``<out>/teacher-<key>.yaml`` (the input config with ``teacher.checkpoint`` pointing at the .pt). Returns the
    report, with ``reused`` telling whether training was skipped.
    """
    _check_config(cfg)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg, recipe)
    ckpt, report_path, cfg_path = (out / f"teacher-{key}.{ext}" for ext in ("pt", "json", "yaml"))
    final_cfg = replace(cfg, teacher=replace(cfg.teacher, checkpoint=str(ckpt)))
    if ckpt.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        log(f"reusing cached teacher {ckpt} (key {key})")
        settings = {**asdict(cfg.teacher.sampling), "per_class": recipe.eval_per_class, "seed": cfg.seed}
        old = report.get("quality", {}).get("teacher", {}).get("sampling", {})
        if evaluate and {k: old.get(k) for k in settings} != settings:
            log(f"[{cfg.teacher.family}] sampling or evaluation size changed: re-evaluating the cached teacher")
            report["quality"] = evaluate_any_teacher(build_teacher(final_cfg.teacher), cfg, recipe.eval_per_class)
            _atomic_json(report_path, report)
        dump_yaml(final_cfg, cfg_path)  # the current sampling / dtype, for the jobs that read this config
        report["reused"] = True
        return report

    t_start = time.perf_counter()
    family = cfg.teacher.family
    torch.manual_seed(cfg.seed)
    teacher = build_family(family, var=cfg.teacher.var, llamagen=cfg.teacher.llamagen)
    train, held = digits_split("train"), digits_split("heldout")
    if recipe.max_train_images:
        n = recipe.max_train_images
        train = replace(train, images=train.images[:n], labels=train.labels[:n], indices=train.indices[:n])
    train_images = _quantised(train.images)
    work = out / f"work-{key}"
    work.mkdir(exist_ok=True)

    text = text_teacher.is_text_teacher(cfg)
    tag = f"{family} t2i" if text else family
    if text:
        tok_teacher, tok_ckpt, tok_cfg, vq_info = _text_tokenizer(cfg, recipe, out, train_images, work, log)
        teacher.tokenizer.load_state_dict(tok_teacher.tokenizer.state_dict())
    else:
        log(f"[{family}] tokenizer: {sum(p.numel() for p in teacher.tokenizer.parameters()):,} parameters")
        vq_info = train_tokenizer(teacher.tokenizer, train_images, recipe, log)
        tok_ckpt, tok_cfg = work / "tokenizer_stage.pt", cfg
        _atomic_save({"teacher": teacher.state_dict()}, tok_ckpt)
    vq_info["heldout_reconstruction_mse"] = reconstruction_mse(teacher.tokenizer, _quantised(held.images))

    log(f"[{tag}] tokenising {len(train)} PNG digits through DALI")
    C = teacher.num_classes
    ids, labels, tok_summary = _tokenise_through_dali(tok_cfg, tok_ckpt, to_uint8(train.images),
                                                      training_labels(train.labels, C), work)
    with torch.no_grad():
        direct = teacher.encode(train_images[:256])
    dali_agreement = float((direct == ids[:256]).float().mean())  # DALI decode vs in-memory images
    held_ids = teacher.encode(_quantised(held.images)).detach()

    n_ar = sum(p.numel() for n, p in teacher.named_parameters() if not n.startswith("tokenizer."))
    log(f"[{tag}] AR transformer: {n_ar:,} parameters, {ids.shape[1]} tokens per image")
    if text:
        if not torch.equal(labels, train.labels):  # captions are matched to token rows by position
            raise RuntimeError(f"token shards in {work / 'tokens'} are not in the order of the train split")
        from dd2dist.text import build_text_encoder

        encoder = build_text_encoder(cfg.teacher.text_encoder)
        records = text_teacher.training_captions(cfg.seed, len(train))
        conds = caption_batches(records, len(train), encoder, teacher.null_cond(1).text[0], recipe.label_drop)
        held_cond = text_teacher.heldout_condition(encoder, cfg.seed)
        log(f"[{tag}] {len(records)} training captions ({text_teacher.CAPTIONS_PER_IMAGE} per image), "
            f"encoder {encoder.name}")
        ar_info = train_ar(teacher, ids, conds, recipe, log, heldout=(held_ids, held_cond))
    else:
        ar_info = train_ar(teacher, ids, labels, recipe, log, heldout=(held_ids, training_labels(held.labels, C)))
    _atomic_save({"teacher": teacher.state_dict()}, ckpt)

    report: dict[str, Any] = {
        "family": family, "key": key, "checkpoint": str(ckpt), "config": str(cfg_path),
        "recipe": asdict(recipe), "tokenizer": vq_info,
        "tokenisation": {"path": "PNG WebDataset shards -> DALI -> tokenizer encoder",
                         "dali_vs_direct_ids": dali_agreement, "images_per_s": tok_summary.get("images_per_s")},
        "ar": ar_info, "params": {"tokenizer": sum(p.numel() for p in teacher.tokenizer.parameters()),
                                  "transformer": n_ar},
    }
    if text:
        report["captions"] = {**text_teacher.caption_settings(), "encoder": cfg.teacher.text_encoder,
                              "property_bins": json.loads(text_teacher.train_bins().to_json())}
    if evaluate:
        loaded = build_teacher(final_cfg.teacher)  # the checkpoint must load through the shared loader
        log(f"[{tag}] evaluating {recipe.eval_per_class} samples per class")
        report["quality"] = evaluate_any_teacher(loaded, cfg, recipe.eval_per_class)
        q = report["quality"]["teacher"]
        if text:
            pa = report["quality"]["prompt_adherence"]
            log(f"[{tag}] teacher FID {q['fid']:.3f}; prompt adherence seen / held-out phrasings: class "
                f"{pa['seen']['class_accuracy']:.3f} / {pa['heldout']['class_accuracy']:.3f}, properties "
                f"{pa['seen']['property_agreement_mean']:.3f} / {pa['heldout']['property_agreement_mean']:.3f}")
        else:
            fit = (f"class consistency {q['class_consistency']:.3f}" if "class_consistency" in q
                   else f"digit mix TV to the held-out digits {q['class_mix_tv']:.3f}")
            log(f"[{family}] teacher FID {q['fid']:.3f} (train-vs-heldout reference "
                f"{report['quality']['reference_train_vs_heldout']['fid']:.3f}), {fit}")
    report["seconds"] = time.perf_counter() - t_start
    dump_yaml(final_cfg, cfg_path)
    _atomic_json(report_path, report)
    shutil.rmtree(work, ignore_errors=True)
    report["reused"] = False
    return report
