"""data_pipelines/validate.py and dd2dist/data/validation.py: JSON report and exit codes on clean and damaged shard
directories."""

import json
import os
import subprocess
import sys
from pathlib import Path

from data_pipelines.validate import main
from dd2dist.data.schema import encode_sample
from dd2dist.data.synthetic import random_sample, random_spec, write_random_shards
from dd2dist.data.validation import validate_dir
from dd2dist.data.writer import ShardSetWriter

SPEC = random_spec(teacher_id="tA")
REPO = Path(__file__).resolve().parents[1]


def _clean(d):
    write_random_shards(d, SPEC, num_samples=25, per_shard=10)
    return d


def test_clean_directory(tmp_path, capsys):
    _clean(tmp_path)
    assert main([str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["shards"] == 3 and report["samples"] == 25 and report["corrupt"] == 0
    assert report["errors"] == [] and report["teacher_ids"] == {"tA": 25}
    assert report["label_histogram"] == {str(c): (3 if c < 5 else 2) for c in range(10)}


def test_damage_is_reported_with_details(tmp_path, capsys):
    shards = write_random_shards(tmp_path, SPEC, num_samples=25, per_shard=10)
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: len(data) // 3])  # truncated
    raws = [encode_sample(random_sample(SPEC, i)) for i in (50, 51)]
    raws[1]["label.i64"] = raws[1]["label.i64"][:4]
    with ShardSetWriter(tmp_path, prefix="extra") as w:
        for r in raws:
            w.write(r)
    Path(shards[2]).with_suffix(".idx").unlink()
    (tmp_path / "x-000000.tar.tmp").write_bytes(b"")
    assert main([str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["corrupt"] == 1 and report["skipped_samples"] == 1
    kinds = {(e["kind"], Path(e["shard"]).name if e["shard"] else None) for e in report["errors"]}
    assert ("corrupt_shard", "tokens-000000.tar") in kinds
    assert ("bad_shape", "extra-000000.tar") in kinds
    assert ("missing_index", "tokens-000002.tar") in kinds
    assert report["partial_files"] == ["x-000000.tar.tmp"]
    bad = next(e for e in report["errors"] if e["kind"] == "bad_shape")
    assert bad["key"] == "s000000051" and "label.i64" in bad["message"]


def test_foreign_and_mixed_teachers(tmp_path, capsys):
    _clean(tmp_path)
    write_random_shards(tmp_path, random_spec(teacher_id="tB"), num_samples=5, per_shard=5, prefix="other")
    report = validate_dir(tmp_path)
    assert not report["ok"] and any(e["kind"] == "mixed_teachers" for e in report["errors"])
    report = validate_dir(tmp_path, teacher_id="tA")
    assert report["refused_shards"] == 1 and report["samples"] == 25 and not report["ok"]
    assert main([str(tmp_path / "nowhere")]) == 1 and "not a directory" in capsys.readouterr().out


def test_mixed_layouts(tmp_path):
    _clean(tmp_path)
    odd = random_spec(teacher_id="tA", num_tokens=16)
    write_random_shards(tmp_path, odd, num_samples=5, per_shard=5, prefix="o", start_index=100)
    report = validate_dir(tmp_path)
    assert not report["ok"] and len(report["layouts"]) == 2
    assert [e["kind"] for e in report["errors"]] == ["mixed_layouts"]


def test_module_entry_point(tmp_path):
    _clean(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "data_pipelines.validate", str(tmp_path)], capture_output=True,
                        text=True, cwd=REPO, env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["samples"] == 25
    (tmp_path / "tokens-000001.tar").write_bytes(b"garbage" * 100)
    bad = subprocess.run([sys.executable, "data_pipelines/validate.py", str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["corrupt"] == 1
