"""What the text-to-image digits teacher adds to the digits teacher job: its class-conditional counterpart (whose
tokenizer it shares), its caption conditions, and its quality report (prompt adherence + FID).

The tokenizer of a text teacher is by definition the one its class-conditional counterpart (same config with the
class prefix instead of caption slots) trains under the same recipe: it is reused from that teacher's cache when
present and otherwise trained exactly as that job would, so the text teacher's weights do not depend on which
teachers were trained before it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor

from dd2dist.conditions import Cond, Sampling
from dd2dist.data.digits import NUM_CLASSES, digits_split, to_uint8
from dd2dist.digits.caption_batches import encode_records
from dd2dist.digits.captions import HELDOUT_TEMPLATES, TEMPLATES, caption_records, prompt_set, train_bins
from dd2dist.teachers.base import ARTeacher
from dd2dist.text import TextEncoder

CAPTIONS_PER_IMAGE = 32  # training phrasings drawn per image (one of them is used each time the image is seen)
CAPTION_VERSION = 1  # bump when the captions or their use in training change what a text config produces
PROPERTY_COMBOS = 6  # thickness words x slant words: prompts per class in one pass over the combinations


def is_text_teacher(cfg: Any) -> bool:
    return cfg.teacher.family == "llamagen" and cfg.teacher.arch.caption_dim > 0


def counterpart_config(cfg: Any) -> Any:
    """The class-conditional digits config whose tokenizer a text teacher shares: the same architecture with one
    class-prefix token for the 10 digits instead of caption slots."""
    lg = replace(cfg.teacher.llamagen, num_classes=NUM_CLASSES, cls_token_num=1, caption_dim=0)
    return replace(cfg, teacher=replace(cfg.teacher, llamagen=lg, text_encoder=None))


def caption_settings() -> dict:
    """What of the captions determines the trained weights (part of the text teacher's cache key)."""
    return {"per_image": CAPTIONS_PER_IMAGE, "version": CAPTION_VERSION, "templates": list(TEMPLATES),
            "heldout_templates": sorted(HELDOUT_TEMPLATES)}


def training_captions(seed: int, num_images: int) -> list[dict]:
    """The true captions of the first ``num_images`` train digits, seen phrasings only."""
    return [r for r in caption_records("train", seed, CAPTIONS_PER_IMAGE) if r["index"] < num_images]


def heldout_condition(encoder: TextEncoder, seed: int) -> Cond:
    """One true caption (seen phrasing) of each held-out digit: the condition of the held-out cross-entropy."""
    return encode_records(caption_records("heldout", seed, 1), encoder)


@torch.no_grad()
def sample_prompt_images(teacher: ARTeacher, records: list[dict], encoder: TextEncoder, sampling: Sampling,
                         seed: int, batch_size: int = 100) -> Tensor:
    """One decoded teacher sample (uint8 (N, 3, H, W)) per caption record, in order."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(records), batch_size):
        cond = encode_records(records[i : i + batch_size], encoder)
        ids = teacher.sample(cond, sampling, generator=gen)
        images.append(to_uint8(teacher.decode(ids)))
    return torch.cat(images)


def evaluate_text_teacher(teacher: ARTeacher, encoder: TextEncoder, sampling: Sampling, per_class: int,
                          seed: int) -> dict:
    """Prompt adherence of teacher samples for every class x property prompt, in seen and in held-out phrasings,
    FID / IS / PR (digits-classifier space) of the seen-phrasing samples vs held-out digits, and the references:
    real held-out digits and their tokenizer reconstructions scored against their own true captions."""
    from dd2dist.eval.classifier import cached_classifier
    from dd2dist.eval.features import digits_feature_space
    from dd2dist.eval.metrics import compute_metrics
    from dd2dist.eval.prompt_adherence import prompt_adherence

    classifier, clf_info, clf_path = cached_classifier()
    bins = train_bins()
    space = digits_feature_space(clf_path)
    held = digits_split("heldout")
    ref = held.uint8()
    per_combo = max(1, math.ceil(per_class / PROPERTY_COMBOS))
    settings = {**asdict(sampling), "per_class": per_class, "seed": seed, "per_combo": per_combo,
                "sampler": "teacher KV-cached AR", "prompts": "every class x thickness x slant"}
    adherence, quality = {}, {}
    for kind, offset in (("seen", 0), ("heldout", 1)):
        records = prompt_set(kind, per_combo, seed)
        images = sample_prompt_images(teacher, records, encoder, sampling, seed + offset)
        adherence[kind] = prompt_adherence(images, records, classifier, bins)
        if kind == "seen":
            quality = compute_metrics(images, ref, space, sampling=settings)
            quality["class_consistency"] = adherence[kind]["class_accuracy"]
    true_captions = caption_records("heldout", seed, 1)
    with torch.no_grad():
        recon = to_uint8(teacher.decode(teacher.encode(ref.float() / 127.5 - 1.0)))
    return {
        "teacher": quality,
        "prompt_adherence": adherence,
        "reference_adherence": {
            "heldout_digits": prompt_adherence(ref, true_captions, classifier, bins),
            "reconstructions": prompt_adherence(recon, true_captions, classifier, bins),
        },
        "reference_reconstructions": compute_metrics(recon, ref, space,
                                                     sampling={"source": "held-out digits encoded and decoded"}),
        "classifier": {"path": clf_path, "heldout_accuracy": clf_info["heldout_accuracy"]},
        "note": "Property words are re-measured from the pixels with the train-split thresholds the captions were "
                "made with; chance is 1/2 (thickness) and 1/3 (slant). The tokenizer caps what any teacher on its "
                "tokens can reach: see reference_adherence.reconstructions. 'heldout' prompts use phrasings that no "
                "training caption used.",
    }
