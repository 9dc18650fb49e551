"""Prompt adherence of digits images: does each image show what its caption says?

The class is read by the digits classifier (:mod:`dd2dist.eval.classifier`); each property word is re-measured
from the pixels with the very thresholds the captions were made with (a ``PropertyBins`` of
:mod:`dd2dist.digits.captions`, per class: the caption's class, the one the image was asked to be). The bins are
taken as an argument, not imported: the digits teacher job imports this layer, so this layer cannot import it.

Chance is 1/10 for the class and 1/(number of words) for each property; a generator that ignores the property
words scores about chance on them even with a perfect class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def prompt_adherence(images_uint8: Tensor, records: list[dict], classifier, bins) -> dict[str, Any]:
    """Scores of images (N, C, H, W) uint8 against their caption records (``class``, ``words``), in order.

    Returns ``class_accuracy``, ``property_agreement`` ({property: fraction}), ``property_agreement_mean``,
    ``all_correct`` (class and every property right), ``chance`` and ``num_images``.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if len(records) != images_uint8.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {len(records)} caption records")
    properties = tuple(bins.cuts)  # property -> per-class thresholds (one fewer than the property's words)
    for i, r in enumerate(records):
        missing = [p for p in properties if p not in r.get("words", {})]
        if "class" not in r or missing:
            raise ValueError(f"caption record {i} lacks 'class' or words {missing}: {r}")
    wanted = np.array([int(r["class"]) for r in records], dtype=np.int64)
    with torch.no_grad():
        predicted = classifier.predict(images_uint8).cpu().numpy()
    class_ok = predicted == wanted
    measured = bins.words_of(images_uint8, wanted)
    prop_ok = {p: np.array([m == r["words"][p] for m, r in zip(measured[p], records)]) for p in properties}
    agreement = {p: float(ok.mean()) for p, ok in prop_ok.items()}
    all_ok = class_ok & np.logical_and.reduce([prop_ok[p] for p in properties])
    return {
        "num_images": int(len(records)),
        "class_accuracy": float(class_ok.mean()),
        "property_agreement": agreement,
        "property_agreement_mean": float(np.mean(list(agreement.values()))),
        "all_correct": float(all_ok.mean()),
        "chance": {"class": 1.0 / 10, **{p: 1.0 / (len(bins.cuts[p][0]) + 1) for p in properties}},
    }
