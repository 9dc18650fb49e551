"""The digits feature classifier: held-out accuracy, cache round trip, input formats."""

import os

import pytest
import torch

from dd2dist.data.digits import digits_split
from dd2dist.eval.classifier import ClassifierRecipe, cached_classifier, classifier_path, load_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("clf"))
    model, info, path = cached_classifier(ClassifierRecipe(), cache)
    return model, info, path, cache


def test_heldout_accuracy_above_090(trained):
    model, info, _, _ = trained
    held = digits_split("heldout")
    acc = float((model.predict(held.images) == held.labels).float().mean())
    assert acc > 0.9
    assert abs(acc - info["heldout_accuracy"]) < 1e-6


def test_cache_reuses_the_file_and_round_trips(trained):
    model, info, path, cache = trained
    assert path == classifier_path(ClassifierRecipe(), cache) and os.path.isfile(path)
    mtime = os.path.getmtime(path)
    model2, info2, path2 = cached_classifier(ClassifierRecipe(), cache)
    assert path2 == path and os.path.getmtime(path) == mtime and info2 == info
    x = digits_split("heldout").images[:8]
    assert torch.equal(model(x), model2(x))
    # a different recipe is a different file
    assert classifier_path(ClassifierRecipe(epochs=1), cache) != path


def test_uint8_and_float_inputs_agree(trained):
    model = trained[0]
    held = digits_split("heldout")
    agree = (model.predict(held.uint8()) == model.predict(held.images)).float().mean()
    assert agree > 0.98


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_classifier(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="state_dict"):
        load_classifier(str(bad))
