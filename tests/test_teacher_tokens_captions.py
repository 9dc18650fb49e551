"""Teacher-token precompute for a text-conditional teacher: conditioned on a caption set (sample i on caption
i mod M), text-conditional shards that the training stream reads back with the caption features, and the
refusals (no caption set, a caption set of another width, captions for a class-conditional teacher)."""

import numpy as np
import pytest
import torch

from dd2dist.config import load_config
from dd2dist.data.caption_shards import read_caption_shards
from dd2dist.data.identity import teacher_id
from dd2dist.data.stats import DataStats
from dd2dist.data.stream import TokenStream
from dd2dist.data.tario import iter_shard_samples
from dd2dist.pipelines.caption_features import encode_captions
from dd2dist.pipelines.teacher_tokens import block_seed, precompute_teacher_tokens
from dd2dist.teachers import build_seeded_teacher

pytestmark = pytest.mark.integration

N, BATCH, M = 11, 4, 5
TEXT_TEACHER = ["teacher.family=llamagen", "teacher.llamagen.num_classes=0", "teacher.llamagen.cls_token_num=8",
                "teacher.llamagen.caption_dim=16", "teacher.text_encoder=hashed:slots=8,width=16",
                "teacher.sampling.guidance_scale=2.0"]
RECORDS = [{"key": f"k{i}", "caption": c, "label": i} for i, c in
           enumerate(["a thin zero", "a bold one", "a small two centred", "three", "a large thick four"])]


@pytest.fixture(scope="module")
def captions(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    encode_captions(RECORDS, "hashed:slots=8,width=16", root / "w16", shard_size=3)
    encode_captions(RECORDS, "hashed:slots=8,width=32", root / "w32", shard_size=3)
    return root


@pytest.fixture(scope="module")
def sampled(captions, tmp_path_factory):
    cfg = load_config(None, TEXT_TEACHER)
    out = tmp_path_factory.mktemp("tokens")
    manifest = precompute_teacher_tokens(cfg, N, out, workers=2, batch_size=BATCH, shard_size=4,
                                         captions=str(captions / "w16"))
    return cfg, out, manifest


def test_shards_are_conditioned_on_caption_i_mod_m(sampled, captions):
    cfg, out, manifest = sampled
    cs = read_caption_shards(captions / "w16")
    assert manifest["complete"] and manifest["num_samples"] == N and manifest["label_histogram"] == {}
    assert manifest["settings"]["labels"] == "captions" and manifest["settings"]["captions"] == cs.fingerprint()
    assert manifest["captions"]["count"] == M and manifest["captions"]["text_shape"] == [8, 16]
    samples = {s.key: s for tar in sorted(out.glob("*.tar")) for s in iter_shard_samples(str(tar), DataStats())}
    assert sorted(samples) == [f"s{i:09d}" for i in range(N)]
    for i in range(N):
        s = samples[f"s{i:09d}"]
        assert s.spec.cond == "text" and s.spec.text_shape == (8, 16) and s.label is None
        assert s.caption_key == cs.keys[i % M] and s.index == i
        assert np.array_equal(s.text, cs.text[i % M].astype(np.float32)) and np.array_equal(s.text_mask, cs.mask[i % M])
    # Block 1 (samples 4..7) is the teacher's own sample for captions 4, 0, 1, 2 and the block seed.
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed)
    ids = teacher.sample(cs.cond([4, 0, 1, 2]), cfg.teacher.sampling, torch.Generator().manual_seed(block_seed(0, 1)))
    assert [samples[f"s{i:09d}"].tokens.tolist() for i in range(4, 8)] == ids.tolist()


def test_training_stream_reads_the_caption_conditions(sampled, captions):
    cfg, out, _ = sampled
    cs = read_caption_shards(captions / "w16")
    stream = TokenStream(str(out), batch_size=N, expect={"teacher_id": teacher_id(cfg.teacher, cfg.seed)},
                         shuffle_buffer=0, resampled=False)
    (batch,) = list(stream)
    assert stream.metrics()["data/samples_skipped"] == 0 and batch.labels is None
    rows = [int(k[1:]) % M for k in batch.keys]
    want = cs.cond(rows)
    assert torch.equal(batch.text, want.text) and torch.equal(batch.text_mask, want.text_mask)
    assert batch.cond().text.shape == (N, 8, 16)


def test_rerun_reuses_and_other_captions_are_refused(sampled, captions, tmp_path):
    cfg, out, _ = sampled
    again = precompute_teacher_tokens(cfg, N, out, workers=1, batch_size=BATCH, captions=str(captions / "w16"))
    assert again["this_run"]["written"] == 0
    other = tmp_path / "other"
    encode_captions(RECORDS[:4], "hashed:slots=8,width=16", other)
    with pytest.raises(ValueError, match="captions="):
        precompute_teacher_tokens(cfg, N, out, workers=1, batch_size=BATCH, captions=str(other))


def test_refusals_before_any_work(captions, tmp_path):
    cfg = load_config(None, TEXT_TEACHER)
    never = tmp_path / "never"
    with pytest.raises(ValueError, match=r"w32: caption features have text shape \(8, 32\).*\(8, 16\)"):
        precompute_teacher_tokens(cfg, N, never, captions=str(captions / "w32"))
    with pytest.raises(ValueError, match="text-conditional.*pass --captions"):
        precompute_teacher_tokens(cfg, N, never)
    class_cfg = load_config(None, ["teacher.family=llamagen"])
    with pytest.raises(ValueError, match="class-conditional"):
        precompute_teacher_tokens(class_cfg, N, never, captions=str(captions / "w16"))
    assert not never.exists()


def test_command_line_takes_captions(captions, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("precompute_job", repo / "jobs/precompute_teacher_tokens.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    sets = [a for o in (*TEXT_TEACHER, "teacher.random_init=true") for a in ("--set", o)]
    assert job.main(["--num-samples", "4", "--output", str(tmp_path), "--batch-size", "4",
                     "--captions", str(captions / "w16"), *sets]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["captions"]["directory"] == str(captions / "w16")
