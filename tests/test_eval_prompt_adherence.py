"""Prompt adherence: real digits score high against their own captions and about chance against shuffled ones."""

import numpy as np
import pytest
import torch

from dd2dist.data.digits import digits_split
from dd2dist.digits.captions import caption_records, train_bins
from dd2dist.eval.classifier import cached_classifier
from dd2dist.eval.prompt_adherence import prompt_adherence


@pytest.fixture(scope="module")
def heldout():
    held = digits_split("heldout")
    return held.uint8(), caption_records("heldout", seed=0, per_image=1), cached_classifier()[0]


def test_real_heldout_digits_follow_their_true_captions(heldout):
    images, records, clf = heldout
    scores = prompt_adherence(images, records, clf, train_bins())
    assert scores["num_images"] == len(records) == images.shape[0]
    assert scores["class_accuracy"] > 0.95
    assert scores["property_agreement"] == {"thickness": 1.0, "slant": 1.0}  # same thresholds as the captions
    assert scores["property_agreement_mean"] == 1.0 and scores["all_correct"] == scores["class_accuracy"]
    assert scores["chance"] == {"class": 0.1, "thickness": 0.5, "slant": pytest.approx(1 / 3)}


def test_shuffled_captions_score_about_chance(heldout):
    images, records, clf = heldout
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    scores = prompt_adherence(images, shuffled, clf, train_bins())
    assert scores["class_accuracy"] < 0.2
    assert abs(scores["property_agreement"]["thickness"] - 0.5) < 0.1
    assert abs(scores["property_agreement"]["slant"] - 1 / 3) < 0.1


def test_bad_input_is_refused(heldout):
    images, records, clf = heldout
    with pytest.raises(ValueError, match="2 images but 3 caption records"):
        prompt_adherence(images[:2], records[:3], clf, train_bins())
    with pytest.raises(ValueError, match="uint8"):
        prompt_adherence(images[:2].float(), records[:2], clf, train_bins())
    broken = [dict(records[0], words={"thickness": "thin"})]
    with pytest.raises(ValueError, match="record 0 lacks"):
        prompt_adherence(images[:1], broken, clf, train_bins())
    assert torch.equal(images, digits_split("heldout").uint8())  # inputs are not modified
