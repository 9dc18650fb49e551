"""Feature spaces for FID / IS / precision-recall, as torch-fidelity feature extractors.

* ``dd2dist-digits-classifier``: our digits CNN (:mod:`dd2dist.eval.classifier`) registered with torch-fidelity;
  its weights file is passed as torch-fidelity's ``feature_extractor_weights_path``. FID and PR use its
  penultimate features, IS its logits.
* ``inception-v3-compat``: torch-fidelity's own InceptionV3 (the TF-FID-compatible one), ALWAYS with a local
  weights file the user supplies (``eval.inception_weights``): torch-fidelity would otherwise download it, which
  we never allow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dd2dist.eval.classifier import load_classifier

DIGITS_EXTRACTOR = "dd2dist-digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
# torch-fidelity 0.4.0's InceptionV3 weights (converted from TF's 2015-12-05 graph); the URL is only quoted in
# errors so a user knows what to fetch on a machine that can.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class DigitsClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor around the digits classifier.

    Features: ``"penultimate"`` (B, feature_dim) for FID / PR, ``"logits"`` (B, 10) for IS. Input: uint8
    (B, 3, H, W), as torch-fidelity passes it.
    """

    FEATURES = ("penultimate", "logits")

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ValueError(
                f"feature extractor {DIGITS_EXTRACTOR!r} needs feature_extractor_weights_path = the digits "
                "classifier file (dd2dist.eval.classifier.cached_classifier() creates it)"
            )
        self.model, self.info = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return DigitsClassifierFeatures.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x: Tensor):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise ValueError(f"expected uint8 images (B, C, H, W), got {getattr(x, 'dtype', type(x))}")
        feats, logits = self.model.features_and_logits(x)
        out = {"penultimate": feats.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)


def register_extractors() -> None:
    """Register our extractors with torch-fidelity (idempotent: the registry refuses duplicates)."""
    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, DigitsClassifierFeatures)


register_extractors()


def resolve_inception_weights(path: str | None) -> str:
    """The local InceptionV3 weights file named by ``eval.inception_weights``; a clear error when it is missing.

    ``path`` may be the file itself or a directory holding ``weights-inception-2015-12-05-6726825d.pth``.
    Never downloads.
    """
    hint = (
        f"InceptionV3 FID weights are never downloaded at run time: fetch {INCEPTION_WEIGHTS_FILE} "
        f"({INCEPTION_WEIGHTS_URL}) on a machine that can, and set eval.inception_weights to its local path"
    )
    if not path:
        raise FileNotFoundError(f"eval.inception_weights is not set. {hint}")
    candidate = os.path.join(path, INCEPTION_WEIGHTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"eval.inception_weights: file not found: {candidate}. {hint}")
    return os.path.abspath(candidate)


@dataclass(frozen=True)
class FeatureSpace:
    """Which torch-fidelity extractor, its local weights file, and the layer each metric reads."""

    extractor: str
    weights_path: str
    fid_layer: str
    isc_layer: str
    prc_layer: str

    def describe(self) -> dict:
        """JSON-ready description recorded next to every number measured in this space."""
        return {"extractor": self.extractor, "weights": self.weights_path, "fid_layer": self.fid_layer,
                "isc_layer": self.isc_layer, "prc_layer": self.prc_layer}


def digits_feature_space(classifier_path: str) -> FeatureSpace:
    """The digits classifier space (penultimate features; logits for IS)."""
    if not os.path.isfile(classifier_path):
        raise FileNotFoundError(f"digits classifier file not found: {classifier_path}")
    return FeatureSpace(DIGITS_EXTRACTOR, os.path.abspath(classifier_path), "penultimate", "logits", "penultimate")


def inception_feature_space(weights_path: str | None) -> FeatureSpace:
    """torch-fidelity's InceptionV3 (pool3 2048-d for FID / PR, unbiased logits for IS) with local weights."""
    return FeatureSpace(INCEPTION_EXTRACTOR, resolve_inception_weights(weights_path), "2048", "logits_unbiased", "2048")
