"""Checkpoint manifests on real files: what verification catches (and names), the cheap check, the CLI."""

import importlib.util
import json
from pathlib import Path

import pytest

from dd2dist.train import manifest

REPO = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("checkpoint_manifest_job", REPO / "jobs" / "checkpoint_manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def step(tmp_path):
    d = tmp_path / "step_00000008"
    (d / "engines" / "generator").mkdir(parents=True)
    (d / "engines" / "generator" / "module.pt").write_bytes(bytes(range(256)) * 40)
    (d / "state.json").write_text(json.dumps({"iteration": 8}))
    (d / "rng").mkdir()
    (d / "rng" / "rank0.pt").write_bytes(b"rng state")
    manifest.write_manifest(d, manifest.build_manifest(d, 8))
    return d


def test_manifest_lists_every_file_and_verifies(step):
    m = manifest.read_manifest(step)
    assert sorted(m["files"]) == ["engines/generator/module.pt", "rng/rank0.pt", "state.json"]
    assert m["files"]["rng/rank0.pt"]["size"] == 9 and len(m["files"]["rng/rank0.pt"]["sha256"]) == 64
    assert manifest.verify(step) == [] and manifest.quick_check(step) is None
    manifest.require_verified(step)


def test_same_size_change_is_caught_by_the_checksum_only(step):
    path = step / "engines" / "generator" / "module.pt"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    assert manifest.quick_check(step) is None  # the cheap check cannot see it
    assert manifest.verify(step) == ["engines/generator/module.pt: sha256 differs from the manifest (changed after "
                                     "the checkpoint was written)"]
    with pytest.raises(manifest.UnverifiedCheckpoint, match="module.pt: sha256 differs"):
        manifest.require_verified(step)


def test_truncated_and_missing_files_are_named(step):
    (step / "rng" / "rank0.pt").write_bytes(b"rng")
    (step / "state.json").unlink()
    assert manifest.verify(step) == ["rng/rank0.pt: 3 bytes, the manifest lists 9", "state.json: missing"]
    assert manifest.quick_check(step) in ("rng/rank0.pt: 3 bytes, the manifest lists 9", "state.json: missing")


def test_unlisted_files_are_ignored(step):
    (step / "tracking.json").write_text("{}")  # the Ray layer writes it after the checkpoint is complete
    assert manifest.verify(step) == []


def test_without_a_manifest_nothing_verifies(step):
    (step / manifest.MANIFEST).unlink()
    [problem] = manifest.verify(step)
    assert problem.startswith("no manifest.json")
    (step / manifest.MANIFEST).write_text("{not json")
    assert manifest.verify(step)[0].startswith("manifest.json unreadable")
    (step / manifest.MANIFEST).write_text(json.dumps({"format": "other", "files": {}}))
    assert manifest.verify(step) == ["manifest.json is not a dd2dist-checkpoint manifest"]


def test_owners_deal_each_file_to_a_rank_that_sees_it():
    owner = manifest._owners([["a", "b", "c", "d"], ["a", "b", "c", "d"]])
    assert owner == {"a": 0, "b": 1, "c": 0, "d": 1}
    # node-local disks: each rank sees only its own files plus the shared ones
    owner = manifest._owners([["s", "x0"], ["s", "x1"], ["x2"]])
    assert owner["x0"] == 0 and owner["x1"] == 1 and owner["x2"] == 2 and owner["s"] in (0, 1)


def test_cli_verifies_and_writes(step, capsys):
    cli = _cli()
    assert cli(["verify", str(step)]) == 0
    (step / manifest.MANIFEST).unlink()
    assert cli(["verify", str(step)]) == 1
    assert "FAILED: no manifest.json" in capsys.readouterr().out
    assert cli(["write", str(step)]) == 0  # a person checked it: bless it
    assert cli(["verify", str(step)]) == 0
    assert manifest.read_manifest(step)["iteration"] == 8
