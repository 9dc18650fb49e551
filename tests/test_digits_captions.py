"""Captions of the digits say what is true of each image; held-out phrasings stay out of training; bins are balanced."""

from collections import Counter

import numpy as np
import pytest
import torch

from dd2dist.data.digits import NUM_CLASSES, digits_split
from dd2dist.digits.captions import (
    HELDOUT_TEMPLATES,
    PROPERTIES,
    PROPERTY_WORDS,
    SEEN_TEMPLATES,
    TEMPLATES,
    PropertyBins,
    caption_records,
    digit_names,
    fit_property_bins,
    measure_properties,
    prompt_set,
    render_caption,
    train_bins,
)
from dd2dist.text import build_text_encoder
from dd2dist.text.encoders import words


@pytest.fixture(scope="module")
def train():
    return digits_split("train")


@pytest.fixture(scope="module")
def records():
    return caption_records("train", seed=0, per_image=3)


def _stroke(width: int, lean: int) -> torch.Tensor:
    """A vertical bar of ``width`` pixels whose top is shifted ``lean`` pixels right of its bottom (uint8 image)."""
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    for r in range(2, 14):
        c = 7 + round(lean * (13 - r) / 11) - lean // 2
        img[0, :, r, c : c + width] = 255
    return img


def test_measured_slant_and_thickness_have_the_meaning_of_their_words():
    upright, right, left = _stroke(2, 0), _stroke(2, 4), _stroke(2, -4)
    s = {name: measure_properties(x)["slant"][0] for name, x in [("up", upright), ("r", right), ("l", left)]}
    assert s["r"] > 0.2 and s["l"] < -0.2 and abs(s["up"]) < 1e-9
    assert measure_properties(_stroke(3, 0))["thickness"][0] > measure_properties(_stroke(1, 0))["thickness"][0]
    assert measure_properties(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))["slant"][0] == 0.0
    with pytest.raises(ValueError, match="uint8"):
        measure_properties(torch.zeros(1, 3, 16, 16))


def test_training_captions_are_true_of_their_images(train, records):
    bins = train_bins()
    remeasured = bins.words_of(train.uint8(), train.labels)
    assert len(records) == 3 * len(train)
    for r in records:
        i = r["index"]
        assert r["class"] == int(train.labels[i]) and r["key"] == f"train-{int(train.indices[i]):04d}"
        for p in PROPERTIES:
            assert r["words"][p] == remeasured[p][i]
        # the text is the template rendered with those words and one of the class's names
        assert r["caption"] == render_caption(r["template"], r["class"], r["words"], r["name"])


def test_heldout_templates_never_reach_training_captions(records):
    assert HELDOUT_TEMPLATES and set(SEEN_TEMPLATES).isdisjoint(HELDOUT_TEMPLATES)
    assert {r["template"] for r in records} == set(SEEN_TEMPLATES)  # every seen phrasing is used
    assert not any(r["heldout"] for r in records)
    heldout_only = {w for t in HELDOUT_TEMPLATES for w in words(TEMPLATES[t])} - {
        w for t in SEEN_TEMPLATES for w in words(TEMPLATES[t])}
    assert heldout_only  # the held-out phrasings bring words no training caption has
    assert not any(set(words(r["caption"])) & heldout_only for r in records)
    with pytest.raises(ValueError, match="seen templates only"):
        caption_records("train", kind="heldout")


def test_bins_are_balanced_within_each_class(train):
    bins = train_bins()
    measured = bins.words_of(train.uint8(), train.labels)
    labels = train.labels.numpy()
    for p in PROPERTIES:
        for c in range(NUM_CLASSES):
            counts = Counter(np.asarray(measured[p])[labels == c])
            n, k = int((labels == c).sum()), len(PROPERTY_WORDS[p])
            assert set(counts) == set(PROPERTY_WORDS[p])
            assert max(abs(v - n / k) for v in counts.values()) <= 1.5, (p, c, counts)


def test_bins_round_trip_through_json_and_refuse_bad_shapes(train):
    bins = fit_property_bins(train.uint8(), train.labels)
    assert bins == train_bins() and PropertyBins.from_json(bins.to_json()) == bins
    with pytest.raises(ValueError, match="slant"):
        PropertyBins({"slant": ((0.0,),) * NUM_CLASSES})
    with pytest.raises(ValueError, match="colour"):
        PropertyBins({"colour": ()})


def test_prompt_sets_cover_every_combination_in_their_own_phrasings():
    for kind, templates in (("seen", set(SEEN_TEMPLATES)), ("heldout", HELDOUT_TEMPLATES)):
        prompts = prompt_set(kind, per_combo=2, seed=1)
        combos = Counter((p["class"], p["words"]["thickness"], p["words"]["slant"]) for p in prompts)
        assert len(combos) == NUM_CLASSES * 2 * 3 and set(combos.values()) == {2}
        assert {p["template"] for p in prompts} <= templates
        assert all(p["heldout"] == (kind == "heldout") for p in prompts)
        assert prompt_set(kind, 2, 1) == prompts and prompt_set(kind, 2, 2) != prompts
    with pytest.raises(ValueError, match="seen' or 'heldout"):
        prompt_set("novel")


def test_every_caption_fits_the_encoder_slots_and_names_its_digit():
    enc = build_text_encoder("hashed:slots=16,width=64")
    longest = {"thickness": "thick", "slant": "leaning right"}
    for t in range(len(TEMPLATES)):
        for c in range(NUM_CLASSES):
            for n, name in enumerate(digit_names(c)):
                caption = render_caption(t, c, longest, n)
                assert len(words(caption)) <= enc.slots and name in caption
    assert digit_names(7) == ("seven", "7", "number seven", "digit 7")
