"""FID / IS / PR through torch-fidelity in the digits space; reference npz; Inception weights; class consistency."""

import os

import numpy as np
import pytest
import torch
from scipy import linalg

from dd2dist.data.digits import digits_split
from dd2dist.eval.classifier import ClassifierRecipe, cached_classifier
from dd2dist.eval.features import (
    INCEPTION_WEIGHTS_FILE,
    digits_feature_space,
    inception_feature_space,
    resolve_inception_weights,
)
from dd2dist.eval.metrics import (
    class_consistency,
    compute_metrics,
    load_reference_npz,
    reference_statistics,
    save_reference_npz,
)

QUICK = ClassifierRecipe(epochs=3)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    model, _, path = cached_classifier(QUICK, str(tmp_path_factory.mktemp("clf")))
    return model, digits_feature_space(path)


@pytest.fixture(scope="module")
def held():
    return digits_split("heldout")


def _numpy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent Frechet distance with scipy's sqrtm."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_a_set_with_itself_is_zero_and_pr_is_one(space, held):
    _, sp = space
    res = compute_metrics(held.uint8(), held.uint8(), sp, sampling={"guidance_scale": 2.0})
    assert abs(res["fid"]) < 1e-6
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert 1.0 <= res["isc_mean"] <= 10.0
    assert res["sampling"] == {"guidance_scale": 2.0}
    assert res["feature_space"]["extractor"] == "dd2dist-digits-classifier"
    assert res["num_generated"] == res["num_reference"] == len(held)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units: singular cov
def test_fid_matches_an_independent_computation_and_grows_with_a_shift(space, held):
    model, sp = space
    train = digits_split("train").uint8()[:300]
    ref = held.uint8()
    res = compute_metrics(train, ref, sp)
    with torch.no_grad():
        f1 = model.features_and_logits(train)[0].double().numpy()
        f2 = model.features_and_logits(ref)[0].double().numpy()
    assert res["fid"] == pytest.approx(_numpy_fid(f1, f2), rel=1e-3, abs=1e-3)
    shifted = compute_metrics(torch.roll(ref, 4, dims=-1), ref, sp)
    assert shifted["fid"] > 5 * max(res["fid"], 1e-3)
    for r in (res, shifted):
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    assert shifted["precision"] < res["precision"]


def test_reference_npz_images_and_statistics_give_the_same_fid(space, held, tmp_path):
    _, sp = space
    gen = digits_split("train").uint8()[:200]
    ref = held.uint8()
    direct = compute_metrics(gen, ref, sp)["fid"]
    p_img = save_reference_npz(str(tmp_path / "ref_images.npz"), images=ref)
    with np.load(p_img) as npz:  # ADM layout: NHWC uint8 under arr_0
        assert npz["arr_0"].shape == (len(held), 16, 16, 3)
    assert compute_metrics(gen, p_img, sp)["fid"] == pytest.approx(direct, rel=1e-6)
    stats = reference_statistics(ref, sp)
    p_stats = save_reference_npz(str(tmp_path / "ref_stats.npz"), mu=stats["mu"], sigma=stats["sigma"])
    res = compute_metrics(gen, p_stats, sp)
    assert res["fid"] == pytest.approx(direct, rel=1e-4)
    assert res["precision"] is None and res["recall"] is None and res["isc_mean"] > 1.0


def test_reference_npz_errors(space, tmp_path):
    _, sp = space
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_reference_npz(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        load_reference_npz(str(tmp_path / "empty.npz"))
    p = save_reference_npz(str(tmp_path / "wrongdim.npz"), mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="dimension 5"):
        compute_metrics(digits_split("heldout").uint8()[:20], p, sp)


def test_inputs_must_be_uint8(space, held):
    with pytest.raises(ValueError, match="uint8"):
        compute_metrics(held.images, held.uint8(), space[1])


def test_missing_inception_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as err:
        inception_feature_space(None)
    assert "eval.inception_weights" in str(err.value)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights.*nothere.pth"):
        inception_feature_space(str(tmp_path / "nothere.pth"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        resolve_inception_weights(str(tmp_path))  # a directory without the file
    (tmp_path / INCEPTION_WEIGHTS_FILE).write_bytes(b"")
    assert resolve_inception_weights(str(tmp_path)) == str(tmp_path / INCEPTION_WEIGHTS_FILE)


def test_inception_space_runs_on_local_random_weights(tmp_path, monkeypatch):
    """torch-fidelity's real InceptionV3 class, loading a local file strictly (random weights), no download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(_RandomInit("random", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # a download would land here
    sp = inception_feature_space(str(tmp_path))
    imgs = digits_split("heldout").uint8()[:6]
    res = compute_metrics(imgs, imgs, sp, isc=False, prc=False, batch_size=6)
    assert abs(res["fid"]) < 1e-3 and res["feature_space"]["fid_layer"] == "2048"
    assert not os.path.exists(tmp_path / "torch_home")


def test_class_consistency_against_known_predictions(space, held):
    model, _ = space
    imgs, labels = held.uint8(), held.labels
    pred = model.predict(imgs)
    res = class_consistency(imgs, labels, model)
    assert res["class_consistency"] == pytest.approx(float((pred == labels).float().mean()))
    p, n = res["class_consistency"], len(labels)
    assert res["class_consistency_se"] == pytest.approx((p * (1 - p) / n) ** 0.5) and res["num_images"] == n
    wrong = (labels + 1) % 10
    assert class_consistency(imgs, wrong, model)["class_consistency"] < 0.2
    only3 = labels == 3
    part = class_consistency(imgs[only3], labels[only3], model)
    assert part["per_class"][3] == pytest.approx(part["class_consistency"])
    assert all(v is None for i, v in enumerate(part["per_class"]) if i != 3)
    with pytest.raises(ValueError, match="requested"):
        class_consistency(imgs[:3], labels[:4], model)


def test_class_mix_counts_predictions_and_its_tv_is_half_the_l1_distance():
    from dd2dist.eval.metrics import class_mix_tv, predicted_class_mix

    mix = predicted_class_mix(torch.tensor([0, 0, 3, 9]), 10)
    assert mix.tolist() == [0.5, 0, 0, 0.25, 0, 0, 0, 0, 0, 0.25]
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert class_mix_tv(mix, mix) == 0.0 and class_mix_tv(uniform, uniform) == 0.0
    assert class_mix_tv(mix, uniform) == pytest.approx(0.5 * (0.4 + 0.15 + 0.15 + 7 * 0.1))
    only0, only1 = predicted_class_mix(torch.zeros(5, dtype=torch.long)), predicted_class_mix(torch.ones(5).long())
    assert class_mix_tv(only0, only1) == pytest.approx(1.0)  # disjoint mixes
