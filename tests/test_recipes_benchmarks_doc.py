"""docs/results.md quotes the raw GPU JSON faithfully: every table row of its GPU teacher sampler section (§5) is
checked against docs/results/gpu_samplers/, and the GPU speed table (§4) against docs/results/speed/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "results.md").read_text()
RAW = REPO / "docs" / "results" / "gpu_samplers"
SPEED_RAW = REPO / "docs" / "results" / "speed" / "gpu_2026-11-26_h100.json"
LLAMAGEN_CURRENT = "llamagen_samplers_h200.json"
LLAMAGEN_BEFORE = "llamagen_samplers_h200_before_fused_decode.json"
COMPILE_REPEATS = ("llamagen_compiled_step_h200_run1.json", "llamagen_compiled_step_h200_run2.json")


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
    for name in ("var_samplers_h200.json", LLAMAGEN_CURRENT, COMPILE_REPEATS[0]):
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


@pytest.mark.parametrize("column, name", [(3, LLAMAGEN_CURRENT), (4, LLAMAGEN_BEFORE)])
def test_llamagen_sampler_table(column, name):
    runs = _raw(name)["L_sampling_cfg2_topk900_no_vq_decode"]
    rows = _rows("| batch | dtype | CUDA graph | current sampler")
    assert len(rows) == 8
    for cells in rows:
        graph = cells[2] == "yes"
        match = [r for r in runs if r["B"] == int(cells[0]) and r["dtype"] == cells[1] and r["cuda_graph"] == graph]
        if cells[column] == "–":
            assert not match, cells
            continue
        assert len(match) == 1 and _close(cells[column], match[0]["s_per_image"]), (cells, name)


def test_llamagen_compile_table():
    runs = [_raw(n)["L_bf16_graph_cfg2_topk900"] for n in COMPILE_REPEATS]
    rows = _rows("| batch | compiled decode step |")
    assert len(rows) == 4
    for cells in rows:
        compiled = cells[1] == "yes"
        firsts = re.findall(r"\d+\.\d+", cells[4])[:2]
        for run, cell, first in zip(runs, cells[2:4], firsts):
            (row,) = [r for r in run if r["B"] == int(cells[0]) and r["compile_step"] == compiled]
            assert _close(cell, row["s_per_image"]) and _close(first, row["first_call_s"]), cells


def test_gpu_speed_table():
    """The H100 one-step vs teacher table of §4: milliseconds per batch and the one-step / teacher-forced ratio."""
    raw = json.loads(SPEED_RAW.read_text())
    assert raw["device"] in DOC and raw["torch"] in DOC
    names = {"VAR-d16": "var_d16", "LlamaGen-L": "llamagen_l", "digits VAR": "digits_var",
             "digits LlamaGen": "digits_llamagen"}
    rows = _rows("| model | B | teacher AR | +dec | one-step")
    assert len(rows) == 8
    for cells in rows:
        (result,) = [r for r in raw["results"] if r["model"] == names[cells[0]] and r["batch_size"] == int(cells[1])]
        t = result["timings"]
        for cell, key in zip(cells[2:7], ("teacher_ar", "teacher_ar_decode", "one_step", "one_step_decode",
                                          "teacher_forced")):
            assert _close(cell, 1000 * t[key]["median_s"]), (cells, key)
        speedup = t["teacher_ar_decode"]["median_s"] / t["one_step_decode"]["median_s"]
        assert _close(cells[7].rstrip("×"), speedup), cells
        assert _close(cells[8], result["one_step_over_teacher_forced"]), cells
