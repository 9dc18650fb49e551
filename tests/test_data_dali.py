"""DALI image pipeline vs the PIL reference, image shards, and real-image tokenisation into token shards."""

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd2dist.config import ExperimentConfig
from dd2dist.data.identity import teacher_id
from dd2dist.data.image_shards import pil_preprocess, write_image_shards
from dd2dist.data.stream import TokenStream
from dd2dist.data.validation import validate_dir
from dd2dist.pipelines.tokenize_images import iter_dali_images, tokenize_images
from dd2dist.teachers import build_seeded_teacher

SIZES = [(48, 64), (64, 48), (40, 40), (33, 57), (21, 30)]  # landscape, portrait, square, odd margins


def _photos():
    """Small crops of the two photos that ship with scikit-learn (real image statistics, JPEG-friendly)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out = []
    for i, (h, w) in enumerate(SIZES):
        p = photos[i % 2]
        y0, x0 = 90 + 17 * i, 180 + 11 * i
        crop = Image.fromarray(p[y0 : y0 + 4 * h, x0 : x0 + 4 * w]).resize((w, h), Image.BILINEAR)
        out.append(np.asarray(crop))
    return out


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    photos = _photos()
    labels = [3, 1, 4, 1, 5]
    shards = write_image_shards(d, photos, labels, fmt="png", per_shard=2, prefix="png")
    shards += write_image_shards(d, photos, labels, fmt="jpg", per_shard=3, prefix="jpg", key_prefix="j")
    return d, shards, photos, labels


def _encoded(shards):
    raw = {}
    for s in shards:
        with tarfile.open(s) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if ext in ("png", "jpg"):
                    raw[key] = tf.extractfile(m).read()
    return raw


def test_image_shards_layout(image_shards):
    d, shards, photos, labels = image_shards
    assert [s.rsplit("/", 1)[1] for s in shards] == [
        "png-000000.tar", "png-000001.tar", "png-000002.tar", "jpg-000000.tar", "jpg-000001.tar"]
    with tarfile.open(shards[1]) as tf:
        names = tf.getnames()
        assert names == ["img000000002.cond.cls", "img000000002.label.i64", "img000000002.png",
                         "img000000003.cond.cls", "img000000003.label.i64", "img000000003.png"]
        png = tf.extractfile("img000000002.png").read()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), photos[2])  # lossless
    with pytest.raises(ValueError, match="labels"):
        write_image_shards(d / "x", photos, labels[:2])


@pytest.mark.parametrize("size", [16, 24])
def test_dali_matches_pil(image_shards, size):
    _, shards, _, labels = image_shards
    raw = _encoded(shards)
    seen = []
    for keys, images, got_labels in iter_dali_images(shards, size, batch_size=4, num_threads=1, device="cpu"):
        assert images.shape[1:] == (3, size, size) and images.dtype == torch.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        for key, img in zip(keys, images.numpy()):
            ref = pil_preprocess(raw[key], size)
            diff = np.abs(ref - img)
            # Same geometry; the residue is the two libraries' resampling kernels (and nothing for JPEG
            # decoding beyond that: both decode the same file). 0.15 = 19 grey levels at worst.
            assert diff.mean() < 0.015 and diff.max() < 0.15, (key, diff.mean(), diff.max())
            # A mis-registered crop or swapped axes would be far off (checked: ~0.1 mean for a 1-px shift).
        seen += list(zip(keys, got_labels.tolist()))
    assert seen == [(f"img{i:09d}", y) for i, y in enumerate(labels)] + [(f"j{i:09d}", y) for i, y in enumerate(labels)]


def test_tokenize_images_writes_real_token_shards(image_shards, tmp_path):
    d, shards, _, labels = image_shards
    cfg = ExperimentConfig()
    out = tmp_path / "tokens"
    summary = tokenize_images(cfg, str(d / "png-*.tar"), out, batch_size=3, num_threads=1, device="cpu")
    assert summary["num_samples"] == 5 and summary["image_size"] == 16
    assert summary["label_histogram"] == {"1": 2, "3": 1, "4": 1, "5": 1}
    report = validate_dir(out)
    assert report["ok"] and report["samples"] == 5
    tid = teacher_id(cfg.teacher, cfg.seed)
    batch = next(iter(TokenStream(out, 5, resampled=False, shuffle_buffer=0, expect={"teacher_id": tid})))
    assert batch.keys == [f"img{i:09d}" for i in range(5)] and batch.labels.tolist() == labels
    # The tokens are the teacher tokenizer's codes of the preprocessed images, in key order. (Comparing with
    # codes of the PIL-preprocessed images says little: the random tiny tokenizer maps most patches to a few
    # codes, so even unrelated images agree ~80%. The image-level cross-check above is the meaningful one.)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed)
    dali_in = torch.cat([x for _, x, _ in iter_dali_images(shards[:3], 16, 5, num_threads=1, device="cpu")])
    with torch.no_grad():
        assert torch.equal(teacher.encode(dali_in), batch.tokens)
    with pytest.raises(FileExistsError):
        tokenize_images(cfg, str(d / "png-*.tar"), out, device="cpu")


def test_tokenize_job_command_line(image_shards, tmp_path, capsys):
    d, _, _, _ = image_shards
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("tokenize_job", repo / "jobs/tokenize_images.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "llamagen_tokens"
    argv = ["--images", str(d / "jpg-*.tar"), "--output", str(out), "--device", "cpu", "--threads", "1",
            "--image-size", "16", "--set", "teacher.family=llamagen"]
    with pytest.raises(SystemExit) as info:  # a tokenizer without its weights would write tokens of nothing
        job.main(argv)
    assert info.value.code == 2 and "teacher.checkpoint" in capsys.readouterr().err and not out.exists()
    assert job.main([*argv, "--set", "teacher.random_init=true"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 5 and summary["teacher_id"].startswith("llamagen-own-")
    report = validate_dir(out)
    assert report["ok"] and report["label_histogram"] == {"1": 2, "3": 1, "4": 1, "5": 1}
