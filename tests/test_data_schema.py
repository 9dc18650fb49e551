"""Token-sample codec and the indexed shard writer: byte layout, validation errors, DALI index format."""

import json
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dd2dist.data.schema import (
    SampleError,
    ShardSpec,
    TeacherMismatch,
    TokenSample,
    decode_sample,
    encode_sample,
)
from dd2dist.data.synthetic import random_sample, random_spec, write_random_shards
from dd2dist.data.writer import ShardSetWriter, TokenShardWriter, read_index_keys, remove_partial_shards, write_index


def test_class_sample_bytes_and_round_trip():
    spec = random_spec(num_tokens=5, vocab_size=300, num_classes=17)
    s = TokenSample("k1", np.array([0, 1, 299, 256, 7]), spec, label=16, seed=3, index=9)
    raw = encode_sample(s)
    # Independent encodings: little-endian int16 tokens, ASCII label, little-endian int64 label.
    assert raw["tokens.tok16"] == struct.pack("<5h", 0, 1, 299, 256, 7)
    assert raw["cond.cls"] == b"16"
    assert raw["label.i64"] == struct.pack("<q", 16)
    meta = json.loads(raw["meta.json"])
    assert meta["teacher_id"] == spec.teacher_id and meta["token_shape"] == [5] and meta["seed"] == 3
    assert meta["sampling"]["guidance_scale"] == 1.5 and meta["schema_version"] == 1
    back = decode_sample(raw, {"teacher_id": spec.teacher_id, "num_tokens": 5})
    assert back.key == "k1" and back.label == 16 and back.index == 9 and back.spec == spec
    np.testing.assert_array_equal(back.tokens, [0, 1, 299, 256, 7])
    # DALI readers may only carry label.i64, text readers only cond.cls: either alone decodes.
    assert decode_sample({k: v for k, v in raw.items() if k != "cond.cls"}).label == 16
    assert decode_sample({k: v for k, v in raw.items() if k != "label.i64"}).label == 16


def test_meta_with_the_old_sampling_names_reads_as_the_current_ones():
    spec = random_spec(num_tokens=5, vocab_size=300, num_classes=17)
    raw = encode_sample(TokenSample("k1", np.arange(5), spec, label=2))
    meta = json.loads(raw["meta.json"])
    s = meta["sampling"]
    meta["sampling"] = {"cfg": s["guidance_scale"], "cfg_schedule": s["guidance_schedule"], "top_k": s["top_k"],
                        "top_p": s["top_p"], "temperature": s["temperature"]}
    back = decode_sample({**raw, "meta.json": json.dumps(meta).encode()})
    assert back.spec == spec and back.spec.sampling == spec.sampling


def test_text_sample_round_trip():
    spec = random_spec(text_shape=(6, 4))
    s = random_sample(spec, 3)
    raw = encode_sample(s)
    assert raw["text_mask.u8"] == s.text_mask.astype(np.uint8).tobytes()
    assert len(raw["text.f16"]) == 6 * 4 * 2 and "cond.cls" not in raw
    back = decode_sample(raw)
    np.testing.assert_allclose(back.text, s.text, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(back.text_mask, s.text_mask)
    assert back.label is None


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(tokens=np.array([0, 1, 64, 2, 3])), "tokens.tok16"),  # id == vocab_size
        (dict(tokens=np.array([0, 1, -1, 2, 3])), "tokens.tok16"),
        (dict(tokens=np.zeros(4, dtype=int)), "tokens.tok16"),  # shape
        (dict(tokens=np.zeros(5, dtype=np.float32)), "tokens.tok16"),  # dtype
        (dict(label=10), "label"),  # == num_classes (the null class is never data)
        (dict(label=None), "label"),
        (dict(key="a.b"), "__key__"),
    ],
)
def test_encode_rejects_bad_samples(change, field):
    spec = random_spec(num_tokens=5)
    fields = dict(key="k", tokens=np.arange(5), spec=spec, label=1)
    fields.update(change)
    with pytest.raises(SampleError) as e:
        encode_sample(TokenSample(**fields))
    assert field in str(e.value)


def _raw(spec=None, index=0):
    spec = spec or random_spec(num_tokens=5)
    return encode_sample(random_sample(spec, index))


@pytest.mark.parametrize(
    "mutate, kind, field",
    [
        (lambda r: r.pop("tokens.tok16"), "missing_component", "tokens.tok16"),
        (lambda r: r.pop("meta.json"), "missing_component", "meta.json"),
        (lambda r: (r.pop("cond.cls"), r.pop("label.i64")), "missing_component", "label.i64|cond.cls"),
        (lambda r: r.__setitem__("tokens.tok16", r["tokens.tok16"][:-2]), "bad_shape", "tokens.tok16"),
        (lambda r: r.__setitem__("tokens.tok16", struct.pack("<5h", 1, 2, 3, 4, 999)), "out_of_range", "tokens"),
        (lambda r: r.__setitem__("label.i64", struct.pack("<q", 3)), "bad_value", "cond.cls"),
        (lambda r: r.__setitem__("meta.json", b"{not json"), "bad_meta", "meta.json"),
        (lambda r: r.__setitem__("meta.json", r["meta.json"].replace(b'"schema_version": 1', b'"schema_version": 9')),
         "bad_meta", "schema_version"),
    ],
)
def test_decode_names_key_and_field(mutate, kind, field):
    raw = _raw(index=7)
    mutate(raw)
    with pytest.raises(SampleError) as e:
        decode_sample(raw)
    assert e.value.kind == kind and e.value.key == "s000000007" and field in str(e.value)


def test_decode_expectations():
    raw = _raw()
    with pytest.raises(TeacherMismatch) as e:
        decode_sample(raw, {"teacher_id": "other"})
    assert e.value.kind == "teacher_mismatch" and "other" in str(e.value)
    with pytest.raises(SampleError) as e:
        decode_sample(raw, {"num_tokens": 6})
    assert e.value.kind == "spec_mismatch" and "num_tokens" in str(e.value)
    with pytest.raises(SampleError):
        decode_sample(raw, {"vocab_size": 4096})
    decode_sample(raw, {"teacher_id": "synthetic", "vocab_size": 64, "token_shape": [5]})


def test_spec_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        random_spec(vocab_size=40000)  # does not fit int16
    with pytest.raises(ValueError, match="num_classes"):
        ShardSpec("t", "var", 10, (4,), cond="class", num_classes=0)
    with pytest.raises(ValueError, match="text_shape"):
        ShardSpec("t", "llamagen", 10, (4,), cond="text")


def test_writer_shards_index_and_dali_tool(tmp_path):
    spec = random_spec()
    paths = write_random_shards(tmp_path, spec, num_samples=10, per_shard=4)
    assert [Path(p).name for p in paths] == ["tokens-000000.tar", "tokens-000001.tar", "tokens-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(paths[1]) as tf:
        names = tf.getnames()
    assert names[:5] == [f"s000000004.{c}" for c in ("cond.cls", "label.i64", "meta.json", "tokens.tok16")] + [
        "s000000005.cond.cls"
    ]
    assert read_index_keys(Path(paths[2]).with_suffix(".idx")) == ["s000000008", "s000000009"]
    # Our index is byte-identical to the one DALI's own wds2idx tool writes.
    ref = tmp_path / "ref.idx"
    tool = Path(sys.executable).with_name("wds2idx")
    subprocess.run([str(tool), paths[0], str(ref)], check=True, capture_output=True)
    assert ref.read_text() == Path(paths[0]).with_suffix(".idx").read_text()
    # Offsets point at the data: read one member through the index.
    line = Path(paths[0]).with_suffix(".idx").read_text().splitlines()[2].split()
    ext, off, size = line[12], int(line[13]), int(line[14])
    assert ext == "tokens.tok16"
    with open(paths[0], "rb") as f:
        f.seek(off)
        assert f.read(size) == encode_sample(random_sample(spec, 1))["tokens.tok16"]
    # Same samples, same bytes (fixed mtime): reruns are reproducible.
    again = write_random_shards(tmp_path / "again", spec, num_samples=10, per_shard=4)
    assert Path(again[0]).read_bytes() == Path(paths[0]).read_bytes()
    # A second writer continues the numbering instead of overwriting.
    more = write_random_shards(tmp_path, spec, num_samples=2, per_shard=4, start_index=10)
    assert Path(more[0]).name == "tokens-000003.tar"


def test_writer_rejects_and_aborts(tmp_path):
    spec = random_spec()
    w = TokenShardWriter(tmp_path, spec, maxcount=100)
    with pytest.raises(SampleError, match="spec"):
        w.write_sample(random_sample(random_spec(teacher_id="other"), 0))
    w.close()
    assert not list(tmp_path.iterdir())  # nothing written: no empty shard either
    with pytest.raises(RuntimeError):
        with TokenShardWriter(tmp_path, spec) as w:
            w.write_sample(random_sample(spec, 0))
            raise RuntimeError("interrupted")
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "x-000000.tar.tmp").write_bytes(b"partial")
    assert [p.name for p in remove_partial_shards(tmp_path)] == ["x-000000.tar.tmp"]
    with pytest.raises(ValueError, match="__key__"):
        with ShardSetWriter(tmp_path) as w:
            w.write({"__key__": "bad key", "x.bin": b""})
    with pytest.raises(ValueError, match="empty"):
        empty = tmp_path / "empty.tar"
        tarfile.open(empty, "w").close()
        write_index(empty)
