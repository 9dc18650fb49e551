"""Caption encoding on Ray: identical shards for 1 and 2 workers, output directories tied to encoder and records,
resume of an interrupted run, and the command line."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dd2dist.data.caption_shards import read_caption_shards
from dd2dist.pipelines.caption_features import check_records, encode_captions, load_caption_records
from dd2dist.text import build_text_encoder

pytestmark = pytest.mark.integration

SPEC = "hashed:slots=8,width=16"
SHAPES = ["thin", "bold", "small", "large"]
RECORDS = [{"key": f"d{i:04d}", "caption": f"a {SHAPES[i % 4]} digit {i % 10}", "label": i % 10,
            "split": "train" if i % 5 else "val"} for i in range(23)][::-1]  # not in key order on input


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.suffix in (".tar", ".idx")}


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap1")
    return out, encode_captions(RECORDS, SPEC, out, workers=1, batch_size=4, shard_size=10)


def test_two_workers_write_the_same_shards(one_worker, tmp_path):
    out1, m1 = one_worker
    m2 = encode_captions(RECORDS, SPEC, tmp_path, workers=2, batch_size=4, shard_size=10)
    assert sorted(_files(out1)) == [f"captions-00000{b}.{e}" for b in range(3) for e in ("idx", "tar")]
    assert _files(out1) == _files(tmp_path)
    assert len(m2["this_run"]["workers"]) == 2 and m2["this_run"]["written"] == 23
    for m in (m1, m2):
        assert m["complete"] and m["count"] == 23 and m["text_shape"] == [8, 16]
        assert m["encoder"] == build_text_encoder(SPEC).name
    cs = read_caption_shards(tmp_path)
    assert cs.keys == sorted(r["key"] for r in RECORDS)
    by_key = {r["key"]: r for r in RECORDS}
    assert cs.info[7] == {"label": 7, "split": "train"} and cs.captions[7] == by_key["d0007"]["caption"]
    text, mask = build_text_encoder(SPEC).encode(cs.captions)
    assert np.array_equal(cs.text, text.numpy().astype(np.float16)) and np.array_equal(cs.mask, mask.numpy())


def test_output_is_tied_to_encoder_and_records(one_worker):
    out, manifest = one_worker
    again = encode_captions(RECORDS, SPEC, out, workers=2, batch_size=4, shard_size=10)
    assert again["this_run"]["written"] == 0 and again["encoder"] == manifest["encoder"]  # reused, no work
    with pytest.raises(ValueError, match=f"{out}: caption shards made with encoder="):
        encode_captions(RECORDS, "hashed:slots=8,width=32", out, shard_size=10)
    changed = [dict(r, caption="a digit") if r["key"] == "d0003" else r for r in RECORDS]
    with pytest.raises(ValueError, match=f"{out}: caption shards made with records="):
        encode_captions(changed, SPEC, out, shard_size=10)


def test_interrupted_run_is_resumed(one_worker, tmp_path):
    out1, _ = one_worker
    out = tmp_path / "resumed"
    files = _files(out1)
    out.mkdir()
    for name in ("captions-000000.tar", "captions-000000.idx"):
        (out / name).write_bytes(files[name])
    (out / "captions-000001.tar.tmp").write_bytes(files["captions-000001.tar"][:700])  # cut while writing
    m = encode_captions(RECORDS, SPEC, out, workers=1, batch_size=4, shard_size=10)
    assert m["this_run"]["written"] == 13 and _files(out) == files and not list(out.glob("*.tmp"))


def test_bad_records_are_named():
    with pytest.raises(ValueError, match="record 1: key 'a' already used by record 0"):
        check_records([{"key": "a", "caption": "x"}, {"key": "a", "caption": "y"}])
    with pytest.raises(ValueError, match="record 0: __key__ must be"):
        check_records([{"key": "a.b", "caption": "x"}])
    with pytest.raises(ValueError, match="record 0: needs 'key' and 'caption'"):
        check_records([{"key": "a"}])


def test_command_line(ray_session, tmp_path, capsys):
    lines = tmp_path / "captions.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS[:6]) + "\n\n")
    assert len(load_caption_records(lines)) == 6
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("encode_job", repo / "jobs/encode_captions.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "out"
    assert job.main(["--captions", str(lines), "--encoder", SPEC, "--output", str(out), "--workers", "2",
                     "--shard-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["count"] == 6 and "shards" not in summary
    assert len(read_caption_shards(out)) == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON object"):
        load_caption_records(bad)
