"""The fixed digits split: sizes, stratification, disjointness, determinism, preprocessing."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dd2dist.data.digits import digits_split, preprocess, split_indices, to_uint8


def test_split_is_fixed_disjoint_complete_and_stratified():
    raw = load_digits()
    train, held = digits_split("train"), digits_split("heldout")
    assert len(train) + len(held) == 1797
    assert len(np.intersect1d(train.indices, held.indices)) == 0
    assert np.array_equal(np.sort(np.concatenate([train.indices, held.indices])), np.arange(1797))
    counts = np.bincount(raw.target, minlength=10)
    held_counts = np.bincount(held.labels.numpy(), minlength=10)
    # every class is held out in the same proportion (rounded per class)
    assert np.all(np.abs(held_counts - 0.2 * counts) <= 0.5 + 1e-9)
    assert np.array_equal(held.labels.numpy(), raw.target[held.indices])
    again = digits_split("heldout")
    assert np.array_equal(again.indices, held.indices) and torch.equal(again.images, held.images)


def test_split_depends_only_on_its_own_seed():
    labels = load_digits().target
    a = split_indices(labels)
    b = split_indices(labels)
    c = split_indices(labels, seed=1)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


def test_preprocess_matches_bilinear_upsampling_on_three_channels():
    raw = load_digits().images[:5]
    x = preprocess(raw)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    ref = F.interpolate(torch.tensor(raw, dtype=torch.float32)[:, None] / 16, size=16, mode="bilinear") * 2 - 1
    assert torch.allclose(x[:, :1], ref, atol=1e-6)
    # downsampling the 16x16 image by 2x2 averaging stays close to the original 8x8 digit
    back = F.avg_pool2d(x[:, :1], 2)[:, 0]
    assert (back - (torch.tensor(raw) / 8 - 1)).abs().mean() < 0.15


def test_uint8_conversion():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


def test_bad_split_name():
    import pytest

    with pytest.raises(ValueError, match="heldout"):
        digits_split("test")
