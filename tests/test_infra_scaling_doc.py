"""docs/scaling.md: its generated tables equal the scripts' output, and the scripts' arithmetic is right."""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra import memory_table as mt  # noqa: E402
from infra import shard_sizing as ss  # noqa: E402

BLOCK = re.compile(r"<!-- BEGIN (\S+) -->\n(.*?)\n<!-- END \1 -->", re.S)


def test_doc_tables_are_the_scripts_output() -> None:
    in_doc = dict(BLOCK.findall((REPO / "docs/scaling.md").read_text()))
    generated = mt.all_markdown()
    assert set(in_doc) == set(generated), f"doc blocks {sorted(in_doc)} vs script blocks {sorted(generated)}"
    for name, block in generated.items():
        assert in_doc[name] == block, f"docs/scaling.md block {name!r} is stale: rerun infra/memory_table.py"


def test_memory_by_hand() -> None:
    """VAR-d16 worked out independently of the script's formulas."""
    d16 = next(m for m in mt.MODELS if m.name == "VAR-d16")
    student = 310_283_520 - (1024 * 4096 + 4096) + 22_500_000
    assert d16.student_params == student
    gib = 2**30
    # ZeRO-0: two networks x 16 B/param replicated, teacher bf16 split over 8 ranks.
    assert mt.stage2_gib(d16, 0, 8) == pytest.approx((2 * 16 * student + 2 * 310_283_520 / 8) / gib)
    # ZeRO-3: everything split over 8 ranks.
    assert mt.stage2_gib(d16, 3, 8) == pytest.approx((2 * 16 * student + 2 * 310_283_520) / 8 / gib)
    # ZeRO-2 with one rank is no sharding at all.
    assert mt.stage2_gib(d16, 2, 1) == pytest.approx(mt.stage2_gib(d16, 0, 1))


def test_memory_monotone_and_checked() -> None:
    for model in mt.MODELS:
        for n in (8, 64):
            values = [mt.stage2_gib(model, z, n) for z in mt.ZERO_STAGES]
            assert values == sorted(values, reverse=True), f"{model.name}: memory must fall with the ZeRO stage"
        # Our student counts stay within 2% of the paper's.
        if model.paper_student_params:
            assert abs(model.student_params / model.paper_student_params - 1) < 0.02, model.name
    with pytest.raises(ValueError, match="zero_stage"):
        mt.trained_bytes(1, 4, 8)
    with pytest.raises(ValueError, match="world_size"):
        mt.stage2_gib(mt.MODELS[0], 0, 0)


def test_paper_hours_add_up() -> None:
    for name, hours in mt.PAPER_HOURS.items():
        stages = sum(hours[k] for k in ("adaptation", "stage1_head", "stage1_full", "stage2", "alignment"))
        assert stages == pytest.approx(hours["total"], abs=0.05), name
    # Tab.3 speed-ups (docs/method.md §13.4): 2.6x, 2.8x, 6.3x, 12.3x.
    speedups = [round(h["dd1_total"] / h["total"], 1) for h in mt.PAPER_HOURS.values()]
    assert speedups == [2.6, 2.8, 6.3, 12.3]


@pytest.mark.parametrize("mtime", [0, None], ids=["integer-mtime", "webdataset-default-mtime"])
def test_shard_size_matches_a_real_webdataset_tar(tmp_path: Path, mtime) -> None:
    import webdataset as wds

    meta = json.dumps({"teacher": "var_d16", "tokens": 680, "cfg": 2.0, "top_k": 900, "top_p": 0.95,
                       "seed": 1234}).encode()
    samples = 57
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path), mtime=mtime) as writer:
        for i in range(samples):
            writer.write({"__key__": f"{i:09d}", "tokens.tok16": np.arange(680, dtype="<i2").tobytes(),
                          "cond.cls": str(i * 37 % 1000), "label.i64": np.int64(i).tobytes(),
                          "meta.json": meta})
    # Labels of 1-3 digits all fit one block, like the script's 3-digit default.
    per_sample = ss.sample_bytes(680, meta_bytes=len(meta), float_mtime=mtime is None)
    assert path.stat().st_size == ss.shard_bytes(samples, per_sample)
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 4 * samples
    assert ss.samples_per_shard(path.stat().st_size, per_sample) == samples


def test_shard_arithmetic() -> None:
    assert ss.member_bytes(0) == 512 and ss.member_bytes(1) == 1024 and ss.member_bytes(1360) == 2048
    assert ss.sample_payloads(680)["tokens.tok16"] == 1360
    assert ss.sample_payloads(256)["tokens.tok16"] == 512
    per_sample = ss.sample_bytes(680)
    fits = ss.samples_per_shard(1e9, per_sample)
    assert ss.shard_bytes(fits, per_sample) <= 1e9 < ss.shard_bytes(fits + 2, per_sample)
    with pytest.raises(ValueError):
        ss.member_bytes(-1)
