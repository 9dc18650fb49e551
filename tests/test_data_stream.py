"""Streaming reader: round trip, resume determinism, rank split, with_epoch, and bad data skipped and counted."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dd2dist.data.schema import encode_sample
from dd2dist.data.stream import TokenStream, list_shards
from dd2dist.data.synthetic import random_sample, random_spec, write_random_shards
from dd2dist.data.writer import ShardSetWriter

SPEC = random_spec(teacher_id="teacherA", num_tokens=21, vocab_size=64, num_classes=10)
EXPECT = {"teacher_id": "teacherA", "num_tokens": 21}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_random_shards(d, SPEC, num_samples=60, per_shard=10)
    return d


def _keys(batches):
    return [k for b in batches for k in b.keys]


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_finite_pass_round_trip(shards):
    batches = list(TokenStream(shards, 7, resampled=False, shuffle_buffer=0, expect=EXPECT))
    assert [len(b.keys) for b in batches] == [7] * 8 + [4]
    assert _keys(batches) == [f"s{i:09d}" for i in range(60)]
    b = batches[1]
    assert b.tokens.dtype == torch.long and b.tokens.shape == (7, 21)
    for row, i in zip(b.tokens, range(7, 14)):
        ref = random_sample(SPEC, i)
        assert torch.equal(row, torch.from_numpy(ref.tokens))
    assert b.labels.tolist() == [i % 10 for i in range(7, 14)]
    assert b.cond().labels is b.labels
    shuffled = list(TokenStream(shards, 7, resampled=False, shuffle_buffer=16, seed=1, expect=EXPECT))
    assert sorted(_keys(shuffled)) == _keys(batches) and _keys(shuffled) != _keys(batches)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_continues_the_same_stream(shards, num_workers):
    kw = dict(batch_size=4, seed=3, rank=1, world_size=2, shuffle_buffer=8, chunk_steps=3, samples_per_draw=5,
              expect=EXPECT, num_workers=num_workers)
    n = 5  # crosses a chunk boundary, resumes mid-chunk
    full = _take(TokenStream(shards, **kw), 2 * n)
    first = TokenStream(shards, **kw)
    head = _take(first, n)
    state = first.state_dict()
    assert state["step"] == n
    resumed = TokenStream(shards, **kw)
    resumed.load_state_dict(state)
    tail = _take(resumed, n)
    assert _keys(head + tail) == _keys(full)
    for a, b in zip(full, head + tail):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    # The stream really is shuffled and resampled (not the file order) and depends on the seed.
    other = _take(TokenStream(shards, **{**kw, "seed": 4}), 2 * n)
    assert _keys(other) != _keys(full)
    assert resumed.metrics()["data/samples"] == 4 * n


def test_resampled_ranks_read_their_own_shards(shards):
    paths = list_shards(shards)
    per_rank = []
    for rank in range(3):
        keys = set(_keys(_take(TokenStream(shards, 8, rank=rank, world_size=3, expect=EXPECT), 10)))
        own = {f"s{i:09d}" for p in paths[rank::3] for i in range(int(p[-10:-4]) * 10, int(p[-10:-4]) * 10 + 10)}
        assert keys <= own and len(keys) > 10
        per_rank.append(keys)
    assert not per_rank[0] & per_rank[1] and not per_rank[1] & per_rank[2]


@pytest.mark.parametrize("world", [2, 4, 7, 8])  # 7, 8 > 6 shards: samples are split by index instead
def test_finite_split_by_rank_is_disjoint_and_covers(shards, world):
    seen = []
    for rank in range(world):
        seen += _keys(TokenStream(shards, 5, rank=rank, world_size=world, resampled=False, expect=EXPECT))
    assert len(seen) == len(set(seen)) == 60


def test_with_epoch_continues_the_stream(shards):
    kw = dict(batch_size=4, chunk_steps=4, expect=EXPECT)
    s = TokenStream(shards, **kw).with_epoch(3)
    e1, e2 = list(s), list(s)
    assert len(e1) == len(e2) == 3 and s.state_dict()["step"] == 6
    assert _keys(e1 + e2) == _keys(_take(TokenStream(shards, **kw), 6))


def _write_raw(path_dir, prefix, raws):
    with ShardSetWriter(path_dir, prefix=prefix) as w:
        for r in raws:
            w.write(r)
    return w.shards[0]


def test_bad_data_is_skipped_counted_and_logged(tmp_path, caplog):
    good = write_random_shards(tmp_path, SPEC, num_samples=20, per_shard=10)
    # A truncated copy of a good shard: samples before the cut survive, the rest of that shard is lost.
    data = Path(good[1]).read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "garbage-000000.tar").write_bytes(os.urandom(3000))
    # One shard with a sample lacking its tokens and one with tokens of the wrong length.
    raws = [encode_sample(random_sample(SPEC, i)) for i in range(100, 104)]
    del raws[1]["tokens.tok16"]
    raws[2]["tokens.tok16"] = raws[2]["tokens.tok16"][:-2]
    _write_raw(tmp_path, "mixed", raws)
    # A shard of another teacher: refused whole.
    _write_raw(tmp_path, "foreign", [encode_sample(random_sample(random_spec(teacher_id="teacherB"), i))
                                     for i in range(200, 205)])
    caplog.set_level(logging.WARNING, logger="dd2dist.data")
    s = TokenStream(tmp_path, 4, resampled=False, shuffle_buffer=0, expect=EXPECT)
    keys = _keys(s)
    m = s.metrics()
    assert not any(k.startswith("s0000002") for k in keys)  # nothing from teacherB
    assert "s000000101" not in keys and "s000000102" not in keys
    assert {"s000000100", "s000000103"} <= set(keys)
    cut = {k for k in keys if keys.count(k) == 2}  # the truncated copy repeats keys of good[1]
    assert 0 < len(cut) < 10
    assert len(keys) == 20 + len(cut) + 2
    assert m["data/shards_corrupt"] == 2  # cut + garbage
    assert m["data/shards_refused"] == 1
    assert m["data/skipped_missing_component"] == 1 and m["data/skipped_bad_shape"] == 1
    assert m["data/samples_skipped"] == 2 and m["data/samples"] == len(keys)
    log = caplog.text
    assert "foreign-000000.tar" in log and "teacherB" in log
    assert "s000000101" in log and "mixed-000000.tar" in log and "garbage-000000.tar" in log


def test_resampled_stream_survives_bad_shards_and_refuses_all_bad(tmp_path):
    write_random_shards(tmp_path / "ok", SPEC, num_samples=10, per_shard=10)
    write_random_shards(tmp_path / "ok", random_spec(teacher_id="teacherB"), num_samples=10, per_shard=10,
                        prefix="b")
    s = TokenStream(tmp_path / "ok", 4, expect=EXPECT, chunk_steps=5)
    assert len(_take(s, 10)) == 10 and s.metrics()["data/shards_refused"] > 0
    only_bad = TokenStream(list_shards(tmp_path / "ok")[:1], 4, expect=EXPECT)
    with pytest.raises(RuntimeError, match="no usable sample"):
        _take(only_bad, 1)


def test_text_batches(tmp_path):
    spec = random_spec(teacher_id="t2i", text_shape=(5, 3))
    write_random_shards(tmp_path, spec, num_samples=6, per_shard=6)
    b = next(iter(TokenStream(tmp_path, 6, resampled=False, shuffle_buffer=0, expect={"teacher_id": "t2i"})))
    assert b.labels is None and b.text.shape == (6, 5, 3) and b.text.dtype == torch.float32
    assert b.text_mask.dtype == torch.bool
    np.testing.assert_array_equal(b.text_mask[2].numpy(), random_sample(spec, 2).text_mask)


def test_bad_arguments(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="data.shards"):
        TokenStream(tmp_path / "empty", 4)
    with pytest.raises(ValueError, match="num_loader_workers"):
        TokenStream(shards, 4, num_workers=2)
    with pytest.raises(ValueError, match="rank"):
        TokenStream(shards, 4, rank=2, world_size=2)
    brace = str(shards) + "/tokens-{000000..000002}.tar"
    assert len(list_shards(brace)) == 3


@pytest.mark.parametrize("where", ["header_start", "mid_header", "mid_data", "before_end_marker"])
def test_truncated_shard_is_corrupt_wherever_cut(tmp_path, where):
    (path,) = write_random_shards(tmp_path / "src", SPEC, num_samples=8, per_shard=8)
    data = Path(path).read_bytes()
    line = Path(path).with_suffix(".idx").read_text().splitlines()[1 + 5].split()  # sample 5
    header = int(line[1]) - 512
    last = Path(path).with_suffix(".idx").read_text().splitlines()[-1].split()
    cut = {
        "header_start": header, "mid_header": header + 200, "mid_data": int(line[13]) + 10,
        "before_end_marker": int(last[-3]) + 512,  # every member kept, the end-of-archive blocks lost
    }[where]
    (tmp_path / "cut-000000.tar").write_bytes(data[:cut])
    s = TokenStream(tmp_path / "cut-000000.tar", 3, resampled=False, shuffle_buffer=0, expect=EXPECT)
    keys = _keys(s)
    assert keys == [f"s{i:09d}" for i in range(len(keys))] and len(keys) <= 7
    assert s.metrics()["data/shards_corrupt"] == 1 and s.metrics()["data/samples_skipped"] == 0


def test_shards_of_another_layout_never_meet_in_a_batch(tmp_path):
    # Same teacher id, but a shard with another token count (e.g. written by a buggy job): refused, no crash.
    write_random_shards(tmp_path, SPEC, num_samples=10, per_shard=10)
    odd = random_spec(teacher_id="teacherA", num_tokens=16)
    write_random_shards(tmp_path, odd, num_samples=10, per_shard=10, prefix="zz")
    s = TokenStream(tmp_path, 4, resampled=False, shuffle_buffer=0, expect={"teacher_id": "teacherA"})
    assert len(_keys(s)) == 10 and s.metrics()["data/shards_refused"] == 1
    r = TokenStream(tmp_path, 4, expect={"teacher_id": "teacherA"}, chunk_steps=4, samples_per_draw=3)
    widths = {b.tokens.shape[1] for b in _take(r, 12)}
    assert len(widths) == 1 and r.metrics()["data/shards_refused"] > 0
