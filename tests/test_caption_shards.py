"""Caption shards: round trip in key order, malformed samples refused naming shard and key, unreadable shards
skipped and counted, and the teacher condition of a caption selection."""

import json

import numpy as np
import pytest
import torch

from dd2dist.data.caption_shards import (
    CAPTIONS_JSON,
    caption_sample,
    read_caption_shards,
    shard_name,
    write_caption_shard,
)
from dd2dist.data.writer import ShardSetWriter
from dd2dist.text import HashedNgramEncoder

ENC = HashedNgramEncoder(slots=8, width=16)
CAPS = {f"c{i:03d}": f"a {['thin', 'bold', 'small'][i % 3]} digit {['zero', 'one', 'two', 'three'][i % 4]}"
        for i in range(10)}


def _samples(keys):
    text, mask = ENC.encode([CAPS[k] for k in keys])
    return [caption_sample(k, CAPS[k], text[j].numpy(), mask[j].numpy(), {"n": int(k[1:])}, (8, 16))
            for j, k in enumerate(keys)]


def _directory(tmp_path, parts, complete=True):
    for number, keys in enumerate(parts):
        write_caption_shard(tmp_path, number, _samples(keys))
    meta = {"encoder": ENC.name, "text_shape": [8, 16], "count": sum(map(len, parts)), "complete": complete,
            "shards": [shard_name(b) for b in range(len(parts))]}
    (tmp_path / CAPTIONS_JSON).write_text(json.dumps(meta))
    return tmp_path


def test_round_trip_in_key_order_and_cond(tmp_path):
    keys = sorted(CAPS)
    # Written out of key order over two shards: read back sorted.
    d = _directory(tmp_path, [keys[5:], keys[:5][::-1]])
    cs = read_caption_shards(d)
    assert cs.keys == keys and cs.captions == [CAPS[k] for k in keys] and len(cs) == 10
    assert cs.info == [{"n": i} for i in range(10)] and cs.encoder == ENC.name and cs.skipped == ()
    text, mask = ENC.encode(cs.captions)
    assert cs.text.dtype == np.float16 and cs.text.shape == (10, 8, 16) and cs.text_shape == (8, 16)
    assert np.array_equal(cs.mask, mask.numpy())
    assert np.array_equal(cs.text, text.numpy().astype(np.float16))
    cond = cs.cond([3, 0, 3])
    assert cond.text.dtype == torch.float32 and cond.text_mask.dtype == torch.bool
    assert torch.equal(cond.text[0], torch.from_numpy(cs.text[3].astype(np.float32)))
    assert torch.equal(cond.text_mask[1], mask[0]) and cond.batch_size == 3
    # Same captions, other sharding: same fingerprint; another caption set: another one.
    other = _directory(tmp_path / "again", [keys])
    assert read_caption_shards(other).fingerprint() == cs.fingerprint()
    fewer = _directory(tmp_path / "fewer", [keys[:9]])
    assert read_caption_shards(fewer).fingerprint() != cs.fingerprint()


def _bad_shard_dir(tmp_path, mutate):
    raw = _samples(sorted(CAPS)[:3])
    mutate(raw[1])
    with ShardSetWriter(tmp_path, prefix="captions", start_shard=0) as w:
        for r in raw:
            w.write(r)
    meta = {"encoder": ENC.name, "text_shape": [8, 16], "count": 3, "complete": True, "shards": [shard_name(0)]}
    (tmp_path / CAPTIONS_JSON).write_text(json.dumps(meta))
    return tmp_path


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update({"text.f16": r["text.f16"][:-2]}), "text.f16 has 254 bytes"),
    (lambda r: r.update({"text_mask.u8": bytes(8)}), "text_mask.u8 must be 8 bytes .* with a valid slot"),
    (lambda r: r.update({"text_mask.u8": bytes(7)}), "text_mask.u8"),
    (lambda r: r.pop("info.json"), "missing"),
])
def test_malformed_sample_is_refused_naming_shard_and_key(tmp_path, mutate, match):
    d = _bad_shard_dir(tmp_path, mutate)
    with pytest.raises(ValueError, match=match) as e:
        read_caption_shards(d)
    assert "captions-000000.tar" in str(e.value) and "'c001'" in str(e.value)


def test_unreadable_shard_is_skipped_and_counted(tmp_path):
    keys = sorted(CAPS)
    d = _directory(tmp_path, [keys[:4], keys[4:7], keys[7:]])
    tar = d / shard_name(1)
    tar.write_bytes(tar.read_bytes()[:1500])  # cut inside the shard
    cs = read_caption_shards(d)
    assert cs.keys == keys[:4] + keys[7:]  # the damaged shard contributes nothing, not half its captions
    assert cs.skipped == (str(tar),)
    tar.unlink()
    assert read_caption_shards(d).skipped == (str(tar),)


def test_directory_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: not a caption shard directory"):
        read_caption_shards(tmp_path)
    d = _directory(tmp_path, [sorted(CAPS)], complete=False)
    with pytest.raises(ValueError, match="not complete"):
        read_caption_shards(d)
    (d / CAPTIONS_JSON).write_text(json.dumps({"encoder": "x", "text_shape": [8], "shards": []}))
    with pytest.raises(ValueError, match="text_shape"):
        read_caption_shards(d)


def test_caption_sample_checks_its_input():
    text, mask = ENC.encode(["one"])
    with pytest.raises(ValueError, match="'k1': text must be finite \\(8, 4\\)"):
        caption_sample("k1", "one", text[0].numpy(), mask[0].numpy(), {}, (8, 4))
    with pytest.raises(ValueError, match="'k1': text_mask"):
        caption_sample("k1", "", text[0].numpy(), np.zeros(8, bool), {}, (8, 16))
    with pytest.raises(ValueError, match="__key__"):
        caption_sample("k.1", "one", text[0].numpy(), mask[0].numpy(), {}, (8, 16))
