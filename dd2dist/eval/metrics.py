"""FID, Inception Score, precision / recall through torch-fidelity, and class consistency.

All metric formulas are torch-fidelity's (``calculate_metrics`` and, for statistics-only references, its
``fid_statistics_to_metric``); this module only feeds it uint8 image datasets, picks the feature space
(:mod:`dd2dist.eval.features`) and records, with every number, the feature space, the sample counts and the
sampling settings that produced the images.

References: a uint8 image tensor, or an ADM-style ``.npz`` batch (``arr_0`` = NHWC uint8 images, and/or ``mu`` /
``sigma`` = FID statistics in the same feature space).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics
from torch_fidelity.metric_fid import fid_input_id_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor

from dd2dist.eval.features import FeatureSpace


class UInt8Images(Dataset):
    """A torch Dataset over uint8 images (N, 3, H, W), the input format torch-fidelity expects."""

    def __init__(self, images: Tensor, name: str = "images"):
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise ValueError(f"{name}: expected a uint8 tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected (N, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[0] < 2:
            raise ValueError(f"{name}: need at least 2 images for the metrics, got {images.shape[0]}")
        self.images = images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def _common_kwargs(space: FeatureSpace, batch_size: int) -> dict[str, Any]:
    return dict(
        feature_extractor=space.extractor,
        feature_extractor_weights_path=space.weights_path,
        feature_layer_fid=space.fid_layer,
        feature_layer_isc=space.isc_layer,
        feature_layer_prc=space.prc_layer,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        cache=False,  # never write under TORCH_HOME; inputs are in-memory tensors anyway
        save_cpu_ram=True,  # no DataLoader worker processes (2-core machines, Ray workers)
        verbose=False,
    )


def load_reference_npz(path: str) -> dict[str, np.ndarray]:
    """An ADM-style reference batch: ``{"images": (N,3,H,W) uint8}`` and/or ``{"mu", "sigma"}``.

    ADM stores images as ``arr_0`` (N, H, W, 3) uint8 and the FID statistics as ``mu`` / ``sigma``; we also accept
    ``images`` in NCHW or NHWC.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval.reference_npz: file not found: {path}")
    with np.load(path) as npz:
        keys = set(npz.files)
        out: dict[str, np.ndarray] = {}
        img_key = "arr_0" if "arr_0" in keys else "images" if "images" in keys else None
        if img_key is not None:
            imgs = npz[img_key]
            if imgs.dtype != np.uint8 or imgs.ndim != 4:
                raise ValueError(
                    f"{path}: {img_key!r} must be uint8 (N, H, W, 3) images, got {imgs.dtype} {imgs.shape}"
                )
            if imgs.shape[-1] == 3 and imgs.shape[1] != 3:
                imgs = imgs.transpose(0, 3, 1, 2)
            out["images"] = np.ascontiguousarray(imgs)
        if "mu" in keys or "sigma" in keys:
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"{path}: has only one of 'mu' / 'sigma'; FID statistics need both")
            mu, sigma = npz["mu"], npz["sigma"]
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ValueError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}")
            out["mu"], out["sigma"] = mu, sigma
    if not out:
        raise ValueError(
            f"{path}: no reference data: expected 'arr_0' (images) and/or 'mu' + 'sigma'; has {sorted(keys)}"
        )
    return out


def save_reference_npz(path: str, images: Tensor | None = None, mu=None, sigma=None) -> str:
    """Write an ADM-style reference batch (``arr_0`` NHWC uint8 and/or ``mu`` / ``sigma``)."""
    data: dict[str, np.ndarray] = {}
    if images is not None:
        data["arr_0"] = UInt8Images(images, "reference").images.permute(0, 2, 3, 1).numpy()
    if mu is not None:
        data["mu"], data["sigma"] = np.asarray(mu), np.asarray(sigma)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **data)
    return path


def reference_statistics(images: Tensor, space: FeatureSpace, batch_size: int = 64) -> dict[str, np.ndarray]:
    """FID statistics (mu, sigma) of ``images`` in ``space``, computed by torch-fidelity."""
    kwargs = _common_kwargs(space, batch_size)
    extractor = create_feature_extractor(space.extractor, [space.fid_layer], **kwargs)
    return fid_input_id_to_statistics(1, extractor, space.fid_layer, input1=UInt8Images(images, "reference"), **kwargs)


def _prc_neighborhood(n_gen: int, n_ref: int) -> int:
    # torch-fidelity's default k=3 needs k < number of samples on each side
    return max(1, min(3, n_gen - 1, n_ref - 1))


def compute_metrics(
    generated: Tensor,
    reference: Tensor | str,
    space: FeatureSpace,
    *,
    sampling: dict | None = None,
    batch_size: int = 64,
    isc: bool = True,
    prc: bool = True,
) -> dict[str, Any]:
    """FID (and IS of ``generated``, precision / recall) of uint8 ``generated`` vs ``reference``.

    ``reference`` is uint8 images or the path of an ADM-style ``.npz``. With statistics only (no images),
    precision / recall cannot be computed and are reported as None. The returned dict is JSON-ready and records
    ``sampling`` (how the images were drawn), the feature space and the sample counts.
    """
    gen = UInt8Images(generated, "generated")
    ref_npz = None
    if isinstance(reference, str):
        ref_npz = load_reference_npz(reference)
        ref_images = torch.from_numpy(ref_npz["images"]) if "images" in ref_npz else None
    else:
        ref_images = reference
    kwargs = _common_kwargs(space, batch_size)
    isc_splits = max(1, min(10, len(gen) // 2))
    out: dict[str, Any] = {}
    if ref_images is not None:
        ref = UInt8Images(ref_images, "reference")
        res = calculate_metrics(
            input1=gen, input2=ref, fid=True, isc=isc, prc=prc, isc_splits=isc_splits,
            prc_neighborhood=_prc_neighborhood(len(gen), len(ref)), **kwargs,
        )
        n_ref = len(ref)
    else:
        extractor = create_feature_extractor(space.extractor, [space.fid_layer], **kwargs)
        stats = fid_input_id_to_statistics(1, extractor, space.fid_layer, input1=gen, **kwargs)
        mu, sigma = ref_npz["mu"], ref_npz["sigma"]
        if mu.shape != stats["mu"].shape:
            raise ValueError(
                f"eval.reference_npz {reference}: statistics of dimension {mu.shape[0]} do not match the "
                f"{stats['mu'].shape[0]}-d '{space.fid_layer}' features of {space.extractor}"
            )
        ref_stats = {"mu": mu.astype(stats["mu"].dtype), "sigma": sigma.astype(stats["sigma"].dtype)}
        res = fid_statistics_to_metric(stats, ref_stats, False)
        if isc:
            res.update(calculate_metrics(input1=gen, isc=True, isc_splits=isc_splits, **kwargs))
        n_ref = None
    out["fid"] = float(res["frechet_inception_distance"])
    out["isc_mean"] = float(res["inception_score_mean"]) if "inception_score_mean" in res else None
    out["isc_std"] = float(res["inception_score_std"]) if "inception_score_std" in res else None
    out["precision"] = float(res["precision"]) if "precision" in res else None
    out["recall"] = float(res["recall"]) if "recall" in res else None
    out["num_generated"] = len(gen)
    out["num_reference"] = n_ref
    out["reference"] = reference if isinstance(reference, str) else "in-memory images"
    out["feature_space"] = space.describe()
    out["sampling"] = dict(sampling or {})
    return out


def predicted_class_mix(predicted: Tensor, num_classes: int = 10) -> Tensor:
    """(num_classes,) float64: the fraction of images a classifier assigned to each class (``predicted``: (B,) ids)."""
    counts = torch.bincount(predicted.cpu().long(), minlength=num_classes).double()
    return counts / max(1, int(predicted.numel()))


def class_mix_tv(mix: Tensor, reference: Tensor) -> float:
    """Total variation between two class mixes (:func:`predicted_class_mix`): 0 same mix, 1 disjoint classes."""
    return 0.5 * float((mix.double() - reference.double()).abs().sum())


@torch.no_grad()
def class_consistency(images: Tensor, requested: Tensor, classifier, num_classes: int = 10) -> dict[str, Any]:
    """Fraction of generated images the held-out classifier assigns to the class they were generated for.

    ``images``: uint8 or [-1, 1] float (B, 3, H, W); ``requested``: (B,) class ids. Returns the overall
    fraction, its binomial standard error sqrt(p (1 - p) / n) (at a fraction of 0.85: 0.019 over 360 images, 0.008 over
    the demo's 1,800), and one fraction per requested class (None for classes not
    requested).
    """
    if images.shape[0] != requested.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {requested.shape[0]} requested labels")
    return consistency_of_predictions(classifier.predict(images), requested, num_classes)


def consistency_of_predictions(pred: Tensor, requested: Tensor, num_classes: int = 10) -> dict[str, Any]:
    """:func:`class_consistency` from the classifier's predictions (B,), for a caller that has made them already."""
    pred, requested = pred.cpu(), requested.cpu()
    hit = (pred == requested).float()
    per_class = []
    for c in range(num_classes):
        sel = requested == c
        per_class.append(float(hit[sel].mean()) if bool(sel.any()) else None)
    p, n = float(hit.mean()), int(pred.shape[0])
    return {"class_consistency": p, "class_consistency_se": math.sqrt(p * (1.0 - p) / n), "per_class": per_class,
            "num_images": n}
