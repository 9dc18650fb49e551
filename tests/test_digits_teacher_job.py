"""jobs/train_teacher.py end to end on the quick recipe: PNG shards -> DALI -> tokens -> AR, caching, loading."""

import importlib.util
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dd2dist.config import load_config
from dd2dist.digits.recipe import QUICK
from dd2dist.digits.teacher_job import cache_key
from dd2dist.teachers import build_teacher

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trains two tokenizers for an epoch each: ~40-90 s on a shared 2-core machine


def _job():
    spec = importlib.util.spec_from_file_location("train_teacher_job", REPO / "jobs" / "train_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    os.environ["DD2DIST_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    job = _job()
    assert job.main(["--config", str(REPO / "configs/teachers/digits_var.yaml"), "--out", str(out), "--quick"]) == 0
    assert job.main(["--config", str(REPO / "configs/teachers/digits_llamagen.yaml"), "--out", str(out), "--quick",
                     "--no-eval"]) == 0
    reports = {json.loads(p.read_text())["family"]: json.loads(p.read_text()) for p in out.glob("teacher-*.json")}
    return job, out, reports


def test_both_families_write_checkpoint_report_and_config(runs):
    _, out, reports = runs
    assert set(reports) == {"var", "llamagen"}
    for rep in reports.values():
        assert Path(rep["checkpoint"]).is_file() and Path(rep["config"]).is_file()
        # every training image went PNG shard -> DALI -> tokenizer, and DALI saw the same pixels as memory
        assert rep["tokenisation"]["dali_vs_direct_ids"] == 1.0
        assert rep["ar"]["steps"] > 0 and rep["tokenizer"]["final_losses"]["rec"] > 0
    assert not list(out.glob("work-*")), "the work directory (image/token shards) is removed after success"
    q = reports["var"]["quality"]
    assert 0.0 <= q["teacher"]["class_consistency"] <= 1.0 and q["teacher"]["fid"] > 0
    assert q["teacher"]["num_generated"] == 10 * QUICK.eval_per_class
    assert q["teacher"]["sampling"]["guidance_scale"] == 0.5  # configs/teachers/digits_var.yaml's sampling is recorded
    assert "quality" not in reports["llamagen"]


def test_checkpoint_loads_through_build_teacher_from_the_written_config(runs):
    _, _, reports = runs
    for rep in reports.values():
        cfg = load_config(rep["config"])
        assert cfg.teacher.checkpoint == rep["checkpoint"]
        teacher = build_teacher(cfg.teacher)
        saved = torch.load(rep["checkpoint"], map_location="cpu", weights_only=True)["teacher"]
        state = teacher.state_dict()
        assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
        assert not any(p.requires_grad for p in teacher.parameters())


def test_second_run_reuses_the_checkpoint(runs):
    job, out, reports = runs
    ckpt = Path(reports["var"]["checkpoint"])
    mtime = ckpt.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert job.main(["--config", str(REPO / "configs/teachers/digits_var.yaml"), "--out", str(out), "--quick"]) == 0
    assert time.perf_counter() - t0 < 15
    assert ckpt.stat().st_mtime_ns == mtime and len(list(out.glob("teacher-*.pt"))) == 2


def test_a_new_sampling_setting_reuses_the_weights_and_re_evaluates(runs):
    job, out, reports = runs
    ckpt = Path(reports["var"]["checkpoint"])
    mtime = ckpt.stat().st_mtime_ns
    assert job.main(["--config", str(REPO / "configs/teachers/digits_var.yaml"), "--out", str(out), "--quick",
                     "--set", "teacher.sampling.guidance_scale=0.0"]) == 0
    assert ckpt.stat().st_mtime_ns == mtime
    report = json.loads(ckpt.with_suffix(".json").read_text())
    assert report["quality"]["teacher"]["sampling"]["guidance_scale"] == 0.0
    assert load_config(ckpt.with_suffix(".yaml")).teacher.sampling.guidance_scale == 0.0


def test_cache_key_follows_weights_not_paths():
    cfg = load_config(REPO / "configs/teachers/digits_var.yaml")
    key = cache_key(cfg, QUICK)
    assert cache_key(replace(cfg, name="other", output_dir="/tmp/elsewhere"), QUICK) == key
    assert cache_key(replace(cfg, seed=1), QUICK) != key
    assert cache_key(cfg, replace(QUICK, ar_epochs=2)) != key
    deeper = load_config(REPO / "configs/teachers/digits_var.yaml", ["teacher.var.depth=2"])
    assert cache_key(deeper, QUICK) != key
    # sampling, dtype and the evaluation size do not change the weights
    other = load_config(REPO / "configs/teachers/digits_var.yaml",
                        ["teacher.sampling.guidance_scale=3.0", "teacher.dtype=bfloat16"])
    assert cache_key(other, replace(QUICK, eval_per_class=9)) == key


def test_refuses_official_and_wrong_class_count(tmp_path):
    from dd2dist.digits.teacher_job import train_digits_teacher

    cfg = load_config(REPO / "configs/teachers/digits_var.yaml", ["teacher.var.num_classes=5"])
    with pytest.raises(ValueError, match=r"num_classes must be 10 for the digits \(class-conditional\) or 1"):
        train_digits_teacher(cfg, tmp_path, QUICK)
    official = load_config(None, ["teacher.official=var_d16"], check_paths=False)
    with pytest.raises(ValueError, match="official"):
        train_digits_teacher(official, tmp_path, QUICK)


def test_an_unconditional_teacher_trains_on_one_label_and_reports_its_mix_of_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("DD2DIST_CACHE_DIR", str(tmp_path / "cache"))
    job = _job()
    config = REPO / "configs/teachers/digits_llamagen_unconditional.yaml"
    assert job.main(["--config", str(config), "--out", str(tmp_path), "--quick"]) == 0
    (report_path,) = tmp_path.glob("teacher-*.json")
    report = json.loads(report_path.read_text())
    teacher = build_teacher(load_config(report["config"]).teacher)
    assert teacher.num_classes == 1  # the digit labels 0-9 would not index its class table: they were all set to 0
    q = report["quality"]["teacher"]
    assert "class_consistency" not in q and q["num_generated"] == 10 * QUICK.eval_per_class
    assert len(q["class_mix"]) == 10 and sum(q["class_mix"]) == pytest.approx(1.0)
    assert 0.0 <= q["class_mix_tv"] <= 1.0 and q["sampling"]["guidance_scale"] == 1.0
