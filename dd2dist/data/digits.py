"""The digits data set every part of dd2dist uses: sklearn's 1,797 real 8x8 digits as 16x16 RGB in [-1, 1].

One fixed, stratified train / held-out split (:func:`digits_split`): the teachers and the feature classifier
train on ``train``; FID references and classifier accuracy use ``heldout``. Changing the split changes every
reported number, so it is seeded by a constant, not by the experiment seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10
IMAGE_SIZE = 16
SPLIT_SEED = 20240607  # fixed forever: all reported digits numbers depend on it
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 3, 16, 16) float32 in [-1, 1] and labels (N,) int64 of one split, plus the source indices."""

    images: Tensor
    labels: Tensor
    indices: np.ndarray  # rows of sklearn's load_digits() this split holds

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def uint8(self) -> Tensor:
        """The images as (N, 3, 16, 16) uint8 in [0, 255] (the metrics' input format)."""
        return to_uint8(self.images)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any float dtype) -> uint8 in [0, 255], clamped and rounded."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def preprocess(raw_8x8: np.ndarray) -> Tensor:
    """sklearn digit images (N, 8, 8) with values 0..16 -> (N, 3, 16, 16) float32 in [-1, 1].

    Bilinear upsampling to 16x16 (the tiny tokenizers downsample 4x to a 4x4 token grid), then the grey value
    repeated on 3 channels because the tokenizers take RGB.
    """
    if raw_8x8.ndim != 3 or raw_8x8.shape[1:] != (8, 8):
        raise ValueError(f"digit images must be (N, 8, 8), got {raw_8x8.shape}")
    x = torch.as_tensor(raw_8x8, dtype=torch.float32)[:, None] / 16.0  # 0..1
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1).contiguous()


def split_indices(labels: np.ndarray, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED):
    """Stratified (train_idx, heldout_idx): each class contributes round(fraction * count) held-out images."""
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(heldout_fraction * len(idx)))
        heldout.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def digits_split(split: str) -> DigitsSplit:
    """The fixed ``"train"`` (1,438 images) or ``"heldout"`` (359 images) split of the digits."""
    if split not in ("train", "heldout"):
        raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
    from sklearn.datasets import load_digits

    raw = load_digits()
    labels = np.asarray(raw.target, dtype=np.int64)
    train_idx, heldout_idx = split_indices(labels)
    idx = train_idx if split == "train" else heldout_idx
    return DigitsSplit(preprocess(raw.images[idx]), torch.as_tensor(labels[idx]), idx)
