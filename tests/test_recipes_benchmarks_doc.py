"""docs/benchmarks.md quotes the raw GPU JSON in docs/gpu_raw/ faithfully (every table row checked against it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "benchmarks.md").read_text()
RAW = REPO / "docs" / "gpu_raw"


def _raw(name: str) -> dict:
    return json.loads((RAW / name).read_text())


def _rows(header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with ``header_start``."""
    lines = DOC.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _close(cell: str, value: float) -> bool:
    """The cell shows ``value`` at the cell's own precision."""
    digits = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell) - value) <= 0.51 * 10 ** -digits


def test_names_the_gpu_and_torch_of_the_raw_files():
    for name in ("var_samplers_h200.json", "llamagen_gpu_v2.json", "llamagen_gpu_compile.json"):
        raw = _raw(name)
        assert raw["device"] in DOC and raw["torch"] in DOC


def test_var_seconds_per_image_table():
    raw = _raw("var_samplers_h200.json")
    rows = _rows("| model | transformer params | batch | sampler only")
    assert len(rows) == 8
    model = None
    for cells in rows:
        model = cells[0] or model
        timing = raw[f"timing_var_{model.split('-')[1].lower()}"]
        if cells[1]:
            assert int(cells[1].replace(",", "")) == timing["params_transformer"]
        batch = timing[f"batch{cells[2]}"]
        assert _close(cells[3], batch["s_per_image_excl_decode"]), cells
        assert _close(cells[4], batch["s_per_image_incl_decode"]), cells


def test_var_per_batch_table():
    raw = _raw("var_samplers_h200.json")
    rows = _rows("| model | batch | sampler | VQ decode")
    assert len(rows) == 8
    for cells in rows:
        batch = raw[f"timing_var_{cells[0].split('-')[1].lower()}"][f"batch{cells[1]}"]
        for cell, key in zip(cells[2:6], ("sample_s_per_batch_excl_decode", "decode_s_per_batch",
                                          "teacher_forced_cfg_pass_s_per_batch", "max_mem_gib")):
            assert _close(cell, batch[key]), (cells, key)


def test_paper_anchors_are_quoted():
    for value in ("0.133", "0.184", "0.251", "5.01"):
        assert value in DOC


@pytest.mark.parametrize("column, name", [(3, "llamagen_gpu_v1.json"), (4, "llamagen_gpu_v2.json")])
def test_llamagen_sampler_table(column, name):
    runs = _raw(name)["L_sampling_cfg2_topk900_no_vq_decode"]
    rows = _rows("| batch | dtype | CUDA graph | run v1")
    assert len(rows) == 8
    for cells in rows:
        graph = cells[2] == "yes"
        match = [r for r in runs if r["B"] == int(cells[0]) and r["dtype"] == cells[1] and r["cuda_graph"] == graph]
        if cells[column] == "–":
            assert not match, cells
            continue
        assert len(match) == 1 and _close(cells[column], match[0]["s_per_image"]), (cells, name)


def test_llamagen_compile_table():
    runs = [_raw(n)["L_bf16_graph_cfg2_topk900"] for n in ("llamagen_gpu_compile.json", "llamagen_gpu_compile_v2.json")]
    rows = _rows("| batch | compiled decode step |")
    assert len(rows) == 4
    for cells in rows:
        compiled = cells[1] == "yes"
        firsts = re.findall(r"\d+\.\d+", cells[4])[:2]
        for run, cell, first in zip(runs, cells[2:4], firsts):
            (row,) = [r for r in run if r["B"] == int(cells[0]) and r["compile_step"] == compiled]
            assert _close(cell, row["s_per_image"]) and _close(first, row["first_call_s"]), cells


def test_llamagen_v1_file_is_the_published_samplers_file():
    assert _raw("llamagen_samplers_h200.json") == _raw("llamagen_gpu_v1.json")
