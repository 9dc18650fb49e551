"""dd2dist/conditions.py: the label orders that evaluation figures depend on, and the renamed Sampling fields."""

from __future__ import annotations

import torch

from dd2dist.conditions import Sampling, class_major_labels, cyclic_labels


def test_cyclic_labels_order_and_offset():
    # The order every evaluation draws its samples in: the same labels, in the same order, for the same call.
    assert cyclic_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert cyclic_labels(4, 3, start=5).tolist() == [2, 0, 1, 2]
    assert torch.equal(cyclic_labels(50, 10), torch.arange(50) % 10)
    assert cyclic_labels(3, 2).dtype == torch.int64


def test_class_major_labels_order():
    assert class_major_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(class_major_labels(10, 4), torch.arange(10).repeat_interleave(4))
    assert class_major_labels(2, 0).numel() == 0


def test_sampling_declares_its_renamed_fields():
    names = {f for f in Sampling.__dataclass_fields__}
    assert set(Sampling.RENAMED_KEYS.values()) <= names
    assert not set(Sampling.RENAMED_KEYS) & names
