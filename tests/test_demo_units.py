"""Fast checks of the demo's own pieces: recipes, the results record and its tables."""

from pathlib import Path

import pytest

from dd2dist.demo import pipeline as demo

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", list(demo.CASES))
@pytest.mark.parametrize("family", demo.FAMILIES)
@pytest.mark.parametrize("quick", [False, True])
def test_recipes_load_as_two_deepspeed_workers_with_demo_paths(family, quick, case, tmp_path):
    cfg = demo.family_config(family, quick, None, tmp_path / family, check_paths=False, case=case)
    suffix = "" if case == "conditional" else "-unconditional"
    assert cfg.teacher.family == family and cfg.name == f"demo-{family}{suffix}{'-quick' if quick else ''}"
    assert cfg.output_dir == str(tmp_path / family)
    assert cfg.launch.num_workers == 2 and cfg.engine.kind == "deepspeed"
    assert cfg.stages == ("stage1", "stage2")
    # both: categorical outputs in principal code order, trained by the exact KL from the stage-1 student; the head
    # reads its own picks at the left and upper neighbours and their prefix's mean (raster) or at the same place in
    # the earlier scales (VAR)
    assert cfg.student.generator_output == "categorical" and cfg.stage2.ode_init_steps == 0
    assert cfg.student.categorical_order == "principal" and not cfg.compact_head.enabled
    assert cfg.student.neighbour_picks == ("left_up_prefix" if family == "llamagen" else "parents")
    assert cfg.eval.num_samples % 10 == 0
    # the teacher architecture is the digits teacher's, so the cached teacher checkpoint fits
    digits = demo.teacher_config(family, case)
    assert cfg.teacher.arch == digits.teacher.arch and cfg.teacher.sampling == digits.teacher.sampling
    assert cfg.teacher.arch.num_classes == (10 if case == "conditional" else 1)
    expected_stage1 = cfg.stage1.head_only_steps + cfg.stage1.steps
    assert demo.stage1_iterations(cfg) == expected_stage1 > 0


def test_bad_eval_sample_count_is_refused_naming_the_key(tmp_path, monkeypatch):
    bad = tmp_path / "var.yaml"
    bad.write_text(f"defaults: [{REPO / 'configs/demo/smoke_var.yaml'}]\neval: {{num_samples: 45}}\n")
    monkeypatch.setattr(demo, "recipe_path", lambda family, quick, case: bad)
    with pytest.raises(ValueError, match=r"eval\.num_samples \(45\)"):
        demo.family_config("var", True, None, tmp_path / "var", check_paths=False)


def _sampler(fid_to_teacher: float, dep: float, fid: float, cc: float | None, mix_tv: float = 0.05) -> dict:
    out = {"fid_to_teacher": fid_to_teacher, "dependence_captured": dep, "dependence_captured_pair_tv": dep,
           "pair_tv": 0.3, "token_marginal_tv": 0.1, "nll_gap": 1.0, "precision": 0.5, "recall": 0.25,
           "fid_heldout": fid, "precision_heldout": 0.4, "recall_heldout": 0.3, "isc_mean": 3.0,
           "class_mix_tv": mix_tv, "settings": {"tokens": "codes"}, "grid": None}
    if cc is not None:  # a class teacher's samplers
        out.update(class_consistency=cc, class_consistency_se=0.01)
    return out


def _report(**samplers) -> dict:
    return {"samplers": samplers, "num_samples": 20, "per_class": 2, "reference": {"what": "draw A"},
            "feature_space": {}, "floor": {"fid": 5.0, "classifier_heldout_accuracy": 0.98}, "seconds": {}}


def test_family_summary_judges_by_dependence_captured_and_keeps_the_heldout_column():
    from dd2dist.demo.report import CONDITIONAL_KEYS, REQUIRED_KEYS, family_summary, markdown_tables, verdict_lines

    report = _report(teacher=_sampler(0.2, 1.0, 10.0, 0.9), marginals=_sampler(4.2, 0.0, 17.0, 0.95),
                     stage1=_sampler(40.0, -9.0, 90.0, 0.5), one_step=_sampler(1.4, 0.7, 14.0, 0.88),
                     dd1=_sampler(3.0, 0.3, 20.0, 0.8))
    train = {"stage2": {"export": "/x/generator.safetensors", "iteration": 10}, "stage1_file": "/x/s1.safetensors"}
    cfg = demo.family_config("var", True, None, Path("/tmp/demo-units/var"), check_paths=False)
    run = {"seconds_by_step": {"teacher": 1.0, "tokens": 2.0, "stage1": 3.0, "stage2": 4.0, "evaluation": 5.0},
           "token_shards": {}, "mlflow": {"run_id": "r", "tracking_uri": "u"}, "grid": "g.png"}
    s = family_summary(report, train, {"checkpoint": "t.pt", "reused": True}, cfg, 16.0, run)
    assert all(key in s for key in REQUIRED_KEYS + CONDITIONAL_KEYS)
    assert s["dependence_captured"] == 0.7 and s["targets"]["dependence_captured_met"]
    assert s["targets"]["beats_dd1"] and s["dependence_captured_dd1"] == 0.3
    assert s["fid_to_teacher_one_step"] == 1.4 and s["fid_one_step"] == 14.0  # teacher-referenced and held-out
    assert s["marginals_over_floor"] == pytest.approx(21.0)
    assert s["fid_ratio_one_step"] == pytest.approx(1.4)
    assert s["class_consistency_gap"] == pytest.approx(0.02)
    assert s["sampling"]["teacher"]["guidance_scale"] == cfg.teacher.sampling.guidance_scale
    table = markdown_tables({"var": s})
    assert "| var | DD2 one-step | 1.400 | 0.70 | 0.300 | 0.100 | 1.00 | 14.000 | 0.880 | 0.050 |" in table
    assert "| var | 1 (reused) | 2 | 3 | 4 | - | 5 | 16 |" in table  # no compact head fitted: its column is "-"
    assert any("0.70 (target >= 0.7: met)" in line for line in verdict_lines({"var": s}))
    # a one-step generator worse than the regression it started from misses both verdicts
    report["samplers"]["one_step"] = _sampler(3.5, 0.2, 16.0, 0.9)
    s = family_summary(report, train, {"checkpoint": "t.pt", "reused": True}, cfg, 16.0, run)
    assert not s["targets"]["dependence_captured_met"] and not s["targets"]["beats_dd1"]


def test_eval_only_accepts_only_eval_overrides():
    assert demo.extra_eval_overrides(("eval.num_samples=100",)) == ["eval.num_samples=100"]
    with pytest.raises(ValueError, match="stage2.generator_steps"):
        demo.extra_eval_overrides(("eval.batch_size=10", "stage2.generator_steps=5"))


def test_eval_only_without_a_trained_run_is_refused_before_any_work(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_job", REPO / "jobs" / "demo.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "config.yaml").write_text("name: x\n")  # var was trained there, llamagen was not
    with pytest.raises(SystemExit) as info:
        job.main(["--eval-only", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no trained run of llamagen" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var"]  # nothing written


def test_an_unconditional_family_is_judged_by_its_digit_mix_not_class_consistency():
    from dd2dist.demo.report import CONDITIONAL_KEYS, REQUIRED_KEYS, family_summary, markdown_tables, verdict_lines

    report = _report(teacher=_sampler(0.2, 1.0, 10.0, None, 0.01), marginals=_sampler(8.2, 0.0, 30.0, None, 0.4),
                     stage1=_sampler(40.0, -4.0, 90.0, None, 0.5), one_step=_sampler(2.2, 0.75, 14.0, None, 0.06))
    train = {"stage2": {"export": "/x/generator.safetensors", "iteration": 10}, "stage1_file": "/x/s1.safetensors"}
    cfg = demo.family_config("llamagen", True, None, Path("/tmp/demo-units/llamagen"), check_paths=False,
                             case="unconditional")
    run = {"seconds_by_step": {"teacher": 1.0, "tokens": 2.0, "stage1": 3.0, "stage2": 4.0, "evaluation": 5.0},
           "token_shards": {}, "mlflow": {"run_id": "r", "tracking_uri": "u"}, "grid": "g.png"}
    s = family_summary(report, train, {"checkpoint": "t.pt", "reused": True}, cfg, 16.0, run)
    assert all(key in s for key in REQUIRED_KEYS) and not any(key in s for key in CONDITIONAL_KEYS)
    assert "class_consistency_gap" not in s and s["class_mix_tv_marginals"] == 0.4
    assert "| llamagen | product of marginals | 8.200 | 0.00 | 0.300 | 0.100 | 1.00 | 30.000 | - | 0.400 |" in \
        markdown_tables({"llamagen": s})
    assert any("digit mix TV to the teacher: one-step 0.060, floor 0.010, marginal product 0.400" in line
               for line in verdict_lines({"llamagen": s}))


def test_the_t2i_demo_has_no_case(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_job", REPO / "jobs" / "demo.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as info:
        job.main(["--t2i", "--case", "unconditional"])
    assert info.value.code == 2 and "--case" in capsys.readouterr().err
