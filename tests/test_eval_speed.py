"""Speed benchmark smoke test at tiny size: every timing present and positive, JSON + PNG written."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dd2dist.eval.speed import (
    TIMINGS,
    build_benchmark_teacher,
    generator_head,
    run_speed_benchmark,
    time_call,
    time_pair,
)

REPO = Path(__file__).resolve().parents[1]


def _benchmark_job():
    spec = importlib.util.spec_from_file_location("bench_job", REPO / "jobs" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_parser():
    return _benchmark_job().speed_parser()


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    args = build_parser().parse_args([
        "--models", "digits_var,digits_llamagen", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "1",
        "--device", "cpu", "--out", str(out), "--quiet",
    ])
    report = run_speed_benchmark(args)
    saved = json.loads(out.read_text())
    assert saved["results"] == report["results"] and Path(report["plot"]).is_file()
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["extrapolated"] is False and "decode" in saved["decode"]
    rows = {(r["model"], r["batch_size"]) for r in report["results"]}
    assert rows == {(m, b) for m in ("digits_var", "digits_llamagen") for b in (1, 2)}
    for r in report["results"]:
        med = {k: r["timings"][k]["median_s"] for k in TIMINGS}
        assert all(v > 0 for v in med.values())
        assert r["speedup_one_step_vs_teacher"] == pytest.approx(med["teacher_ar"] / med["one_step"])
        assert r["s_per_image"]["one_step"] == pytest.approx(med["one_step"] / r["batch_size"])
        assert r["sampling"]["cfg_rows"] == 2 * r["batch_size"]  # both digits configs sample with CFG
        assert r["ar_steps"] == (3 if r["family"] == "var" else 16)
        assert r["generator_head"]["form"] == "sampling"  # timed as evaluation samples it


def test_time_call_excludes_warmup():
    calls = []
    res = time_call(lambda: calls.append(1), warmup=3, repeats=2, device=__import__("torch").device("cpu"))
    assert len(calls) == 5 and res["repeats"] == 2 and res["warmup"] == 3
    assert res["min_s"] <= res["median_s"]


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="var_d99"):
        build_benchmark_teacher("var_d99")


def test_jobs_benchmark_dispatches_to_speed(tmp_path, capsys):
    mod = _benchmark_job()
    out = tmp_path / "s.json"
    rc = mod.main(["speed", "--models", "digits_var", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                   "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file() and out.with_suffix(".png").is_file()
    assert "digits_var" in capsys.readouterr().out


def test_time_pair_interleaves_and_reports_the_median_pair_ratio():
    import torch

    order = []
    a_s, b_s, ratio = time_pair(lambda: order.append("a"), lambda: order.append("b"), warmup=1, repeats=3,
                                device=torch.device("cpu"))
    assert order == ["a", "b"] * 4 and a_s["repeats"] == b_s["repeats"] == 3 and a_s["interleaved"]
    assert ratio > 0


def test_digits_generator_head_is_the_demo_recipes(tmp_path):
    from dd2dist.config import load_config

    for family in ("var", "llamagen"):
        recipe = load_config(REPO / "configs" / "demo" / f"{family}.yaml", check_paths=False).student
        assert generator_head(f"digits_{family}") == recipe
    out = tmp_path / "s.json"
    args = build_parser().parse_args(["--models", "digits_llamagen", "--batch-sizes", "1", "--repeats", "1",
                                      "--warmup", "0", "--device", "cpu", "--head-width", "32", "--quiet",
                                      "--out", str(out)])
    (row,) = run_speed_benchmark(args)["results"]
    assert row["generator_head"]["width"] == 32 and row["generator_head"]["depth"] == recipe.head_depth


def test_benchmark_teacher_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first, _ = build_benchmark_teacher("digits_llamagen")
    assert torch.equal(torch.rand(3), expected)
    second, _ = build_benchmark_teacher("digits_llamagen")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_training_head_form_is_timed_on_request():
    from dd2dist.eval.speed import benchmark_model

    rows = benchmark_model("digits_var", [1], 0, 1, torch.device("cpu"), torch.float32, log=lambda _: None,
                           head_form="training")
    assert rows[0]["generator_head"]["form"] == "training" and rows[0]["timings"]["one_step"]["median_s"] > 0
    with pytest.raises(ValueError, match="head_form"):
        benchmark_model("digits_var", [1], 0, 1, torch.device("cpu"), torch.float32, head_form="folded")


def test_a_compact_head_is_timed_against_its_own_teacher_forced_passes():
    import torch

    from dd2dist.config import load_config
    from dd2dist.config.schema import StudentConfig
    from dd2dist.eval.speed import benchmark_model, compact_head_spec
    from dd2dist.nets.compact_head import CompactHeadSpec

    # both demo recipes' categorical generators sample without a head, so they fit none; a continuous generator
    # given a compact head gets it timed
    for family in ("var", "llamagen"):
        assert not load_config(REPO / "configs" / "demo" / f"{family}.yaml", check_paths=False).compact_head.enabled
        assert compact_head_spec(f"digits_{family}") is None
    assert compact_head_spec("var_d16") is None  # true-size geometries: no recipe, no compact head
    spec = CompactHeadSpec(64, 0, 0)
    continuous = StudentConfig(head_width=128, head_depth=2, time_embed_dim=64, noise_input="mlp", posterior_head=True)
    (row,) = benchmark_model("digits_llamagen", [2], 0, 2, torch.device("cpu"), torch.float32, log=lambda _: None,
                             student_cfg=continuous, compact_spec=spec)
    assert row["compact_head"] == {"width": 64, "depth": 0, "rank": 0}
    assert row["timings"]["one_step_compact"]["interleaved"] and row["timings"]["one_step_compact"]["repeats"] == 2
    assert row["one_step_compact_over_teacher_forced"] > 0
    assert row["s_per_image"]["one_step_compact"] == pytest.approx(row["timings"]["one_step_compact"]["median_s"] / 2)
