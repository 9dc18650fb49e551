"""The token-marginal diagnostic: per-(class, position) code counts and their total variation."""

import pytest
import torch

from dd2dist.eval.token_marginals import class_position_counts, marginal_tv


def test_repeated_tokens_add_up():
    # every row is class 1 with the same ids: a plain indexed += would count each triple once
    ids = torch.tensor([[2, 0, 2]] * 5)
    counts = class_position_counts(ids, torch.ones(5, dtype=torch.long), num_classes=3, vocab_size=4)
    assert counts.shape == (3, 3, 4)
    assert counts[1, 0, 2] == 5 and counts[1, 1, 0] == 5 and counts[1, 2, 2] == 5
    assert counts.sum() == 15 and counts[0].sum() == 0 and counts[2].sum() == 0


def test_tv_by_hand_and_absent_classes_left_out():
    labels = torch.tensor([0, 0, 0, 0])
    a = class_position_counts(torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1]]), labels, 2, 3)
    b = class_position_counts(torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2]]), labels, 2, 3)
    tv = marginal_tv(a, b)
    # position 0: (1/2, 1/2, 0) vs (1, 0, 0) -> 0.5; position 1: (0, 1, 0) vs (0, 3/4, 1/4) -> 0.25
    assert tv["per_position"] == [0.5, 0.25] and tv["mean"] == pytest.approx(0.375)
    assert tv["classes"] == [0]  # class 1 has no samples on either side
    assert marginal_tv(a, a)["mean"] == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="token ids must lie"):
        class_position_counts(torch.tensor([[4]]), torch.tensor([0]), 1, 4)
    with pytest.raises(ValueError, match="labels must lie"):
        class_position_counts(torch.tensor([[0]]), torch.tensor([2]), 2, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        marginal_tv(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="no class"):
        marginal_tv(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
