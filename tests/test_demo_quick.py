"""`python jobs/demo.py --quick`: the whole demo path (teacher, teacher-token shards, stage 1 + stage 2 on 2 DeepSpeed
Ray workers, evaluation, results.json, MLflow) at smoke-test size, for both teacher families.

Quality numbers of the quick run are meaningless; this checks that every stage ran, that the artefacts exist and
that the numbers are well-formed (finite, in their ranges) and agree with what MLflow and the files hold.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _run_quick_demo(out: Path, *extra: str) -> tuple[Path, dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    env.pop("RAY_ADDRESS", None)  # the demo must start its own embedded Ray
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--quick", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((out / "results.json").read_text())
    return out, results, proc.stdout + proc.stderr  # what a user of the demo reads


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    return _run_quick_demo(tmp_path_factory.mktemp("demo_quick"))


def test_the_unconditional_case_runs_both_families_on_teachers_without_labels(tmp_path):
    """``--case unconditional``: teachers trained with one label for every digit, the same demo path, and the
    samplers judged by the mix of digits they draw instead of class consistency."""
    from dd2dist.config import load_config
    from dd2dist.demo.report import CONDITIONAL_KEYS, FAMILIES, REQUIRED_KEYS

    out, results, printed = _run_quick_demo(tmp_path / "demo", "--case", "unconditional")
    assert results["settings"]["case"] == "unconditional"
    for family in FAMILIES:
        r = results[family]
        assert results["settings"]["recipes"][family] == f"configs/demo/smoke_{family}_unconditional.yaml"
        cfg = load_config(out / family / "config.yaml", check_paths=False)
        assert cfg.teacher.arch.num_classes == 1 and cfg.teacher.checkpoint == r["teacher"]["checkpoint"]
        # at 40 samples the marginal product may not sit above the floor: dependence captured is then nan (no range)
        assert all(_finite(r[key]) for key in REQUIRED_KEYS if key != "dependence_captured"), family
        assert isinstance(r["dependence_captured"], float), family
        assert not any(key in r for key in (*CONDITIONAL_KEYS, "class_consistency_gap")), family
        m = r["metrics"]
        assert set(m) >= {"teacher", "marginals", "stage1", "one_step", "refined_2"}, sorted(m)
        for name, res in m.items():
            assert 0.0 <= res["class_mix_tv"] <= 1.0 and sum(res["class_mix"]) == pytest.approx(1.0), name
        manifest = json.loads((Path(r["token_shards"]["dir"]) / "manifest.json").read_text())
        assert manifest["complete"] and manifest["num_samples"] > 0
        assert "digit mix TV to the teacher" in printed


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_results_hold_every_required_number_in_range(quick_demo):
    from dd2dist.demo.report import FAMILIES, REQUIRED_KEYS

    out, results, _ = quick_demo
    assert set(FAMILIES) <= set(results)
    for family in FAMILIES:
        r = results[family]
        for key in REQUIRED_KEYS:
            assert _finite(r[key]), (family, key, r.get(key))
        for key, value in r.items():
            if key.startswith("fid_"):
                assert _finite(value) and value >= 0, (family, key, value)
            if key.startswith(("precision_", "recall_", "class_consistency_", "token_marginal_tv_", "pair_tv_")) \
                    and key not in ("class_consistency_gap", "class_consistency_gap_se"):
                assert _finite(value) and 0.0 <= value <= 1.0, (family, key, value)
            if key.startswith("dependence_captured"):
                assert _finite(value), (family, key, value)
        assert r["seconds"] > 0 and r["seconds"] >= sum(r["seconds_by_step"].values()) - 1e-6
        assert r["classifier_heldout_accuracy"] > 0.9  # the feature space is a working digits classifier
        # the headline is what the flat numbers say: the one-step's place between the marginals and the floor
        m = r["metrics"]
        assert r["dependence_captured"] == pytest.approx(
            (m["marginals"]["fid_to_teacher"] - m["one_step"]["fid_to_teacher"])
            / (m["marginals"]["fid_to_teacher"] - m["teacher"]["fid_to_teacher"]))
        assert m["teacher"]["dependence_captured"] == pytest.approx(1.0)
        assert r["fid_ratio_one_step"] == pytest.approx(r["fid_one_step"] / r["fid_teacher"])
        assert r["class_consistency_gap"] == pytest.approx(
            abs(r["class_consistency_one_step"] - r["class_consistency_teacher"]))
        se = [m[s]["class_consistency_se"] for s in ("one_step", "teacher")]
        assert r["class_consistency_gap_se"] == pytest.approx((se[0] ** 2 + se[1] ** 2) ** 0.5)
        # every number comes with its sampling settings
        assert r["sampling"]["teacher"]["guidance_scale"] > 0 and r["sampling"]["num_samples"] == 40
        assert set(m) >= {"teacher", "marginals", "stage1", "one_step", "one_step_snapped", "refined_2"}, sorted(m)
        # where along the sequence each sampler loses the teacher's likelihood
        assert all(len(m[name]["nll_gap_by_position"]) == len(m["teacher"]["nll_gap_by_position"]) > 0 for name in m)
        # both recipes: categorical outputs, the exact KL from the stage-1 student, no PF-ODE regression, no head to
        # compact; the outputs are codes, so snapping them changes nothing
        assert {"dd1", "one_step_compact"}.isdisjoint(m) and "compact_head" not in r["seconds_by_step"]
        assert "beats_dd1" not in r["targets"]
        assert m["one_step_snapped"]["fid_to_teacher"] == m["one_step"]["fid_to_teacher"]
        assert m["one_step_snapped"]["scores_of"] == "one_step" and "scores_of" not in m["one_step"]  # scored once
        assert m["teacher"]["settings"]["seed_base"] != m["one_step"]["settings"]["seed_base"]
        assert all(f"token_marginal_tv_{name}" in r and f"pair_tv_{name}" in r for name in m), sorted(r)
    assert results["settings"]["quick"] is True
    assert results["settings"]["machine"]["cpu_kernels"] and results["settings"]["machine"]["processor"]
    # both teachers were trained at once (one Ray task each), before the families' students
    assert _finite(results["settings"]["seconds_teachers_concurrent"])
    assert results["settings"]["seconds_teachers_concurrent"] < results["settings"]["seconds_total"]


def test_artefacts_exist_and_load(quick_demo):
    from dd2dist.eval.sampling import load_generator

    out, results, printed = quick_demo
    for family in ("var", "llamagen"):
        r = results[family]
        export = Path(r["export"])
        assert export == out / family / "export" / "generator.safetensors" and export.is_file()
        net, cfg = load_generator(export.parent)
        assert cfg.teacher.family == family and cfg.launch.num_workers == 2 and cfg.engine.kind == "deepspeed"
        assert Path(r["stage1_model"]).is_file()
        assert Path(r["grid"]).is_file() and Path(r["grid"]).stat().st_size > 1000
        manifest = json.loads((Path(r["token_shards"]["dir"]) / "manifest.json").read_text())
        assert manifest["complete"] and manifest["num_samples"] == r["token_shards"]["num_samples"] > 0
        assert r["mlflow"]["run_id"] in printed  # the printed table names the run
        assert "TrainingReport(" in (out / family / "logs" / "rank0.log").read_text()  # the full log of rank 0
    assert Path(results["settings"]["loss_curves"]).is_file()
    assert (out / "results.md").read_text().count("| var |") >= 8


def test_the_stage1_model_is_scored_as_an_ar_diffusion_sampler_on_request(quick_demo):
    """``stage1_ar`` (left out of the demo for its cost): the trained stage-1 model of each family as an AR-diffusion
    sampler, scored like every other sampler, with its own draw."""
    from dd2dist.eval.fidelity import FidelityOptions, fidelity_benchmark

    out, _, _ = quick_demo
    for family in ("var", "llamagen"):
        report = fidelity_benchmark(out / family, FidelityOptions(num_samples=40, batch_size=20,
                                                                  samplers=("teacher", "marginals", "stage1_ar")),
                                    log=lambda _: None)
        ar = report["samplers"]["stage1_ar"]
        # at 40 samples the marginals may not sit above the floor, so dependence captured may be nan (no range)
        assert math.isfinite(ar["fid_to_teacher"]) and "dependence_captured" in ar
        assert ar["settings"]["seed_base"] != report["samplers"]["teacher"]["settings"]["seed_base"]
        assert len(ar["nll_gap_by_position"]) == len(report["samplers"]["teacher"]["nll_gap_by_position"])


def test_the_one_pass_ceiling_is_trained_on_the_run_teacher_and_scored_beside_its_samplers(quick_demo):
    """``benchmark.py ceiling``: the categorical one-pass generator, trained a few steps on each family's teacher, is
    scored as one more sampler with a draw of its own, and the report keeps its training curve."""
    from dd2dist.eval.fidelity import FidelityOptions
    from dd2dist.eval.one_pass_ceiling import CeilingOptions, ceiling_benchmark

    out, _, _ = quick_demo
    for family in ("var", "llamagen"):
        report = ceiling_benchmark(out / family, CeilingOptions(steps=3, batch_size=8, log_every=1),
                                   FidelityOptions(num_samples=40, batch_size=20,
                                                   samplers=("teacher", "marginals", "one_step")),
                                   log=lambda _: None)
        rows = report["samplers"]
        assert set(rows) == {"teacher", "marginals", "one_step", "one_pass_categorical"}
        ceiling = rows["one_pass_categorical"]
        assert math.isfinite(ceiling["fid_to_teacher"]) and ceiling["settings"]["tokens"].startswith("nearest codes")
        assert len({r["settings"]["seed_base"] for r in rows.values()}) == 4
        assert [p["step"] for p in report["ceiling_training"]["curve"]] == [1, 2, 3]


def test_output_is_progress_not_ray_reports_or_dependency_warnings(quick_demo):
    _, _, printed = quick_demo
    assert printed.count("stage2 generator  step 3/3") == 2, printed[-6000:]  # rank 0 of each family's launch
    for noise in ("TrainingReport(", "FutureWarning", "No CUDA runtime is found", "(RayTrainWorker pid=",
                  "Ray deduplicates logs"):
        assert noise not in printed, noise


def test_mlflow_run_holds_training_and_evaluation(quick_demo):
    from mlflow.tracking import MlflowClient

    _, results, _ = quick_demo
    for family in ("var", "llamagen"):
        info = results[family]["mlflow"]
        client = MlflowClient(tracking_uri=info["tracking_uri"])
        run = client.get_run(info["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["eval/one_step/fid_heldout"] == pytest.approx(results[family]["fid_one_step"])
        assert run.data.metrics["eval/one_step/dependence_captured"] == pytest.approx(
            results[family]["dependence_captured"])
        assert run.data.metrics["eval/one_step/token_marginal_tv"] == pytest.approx(
            results[family]["token_marginal_tv_one_step"])
        assert run.data.params["teacher.family"] == family
        generator_loss = client.get_metric_history(info["run_id"], "generator/loss")
        assert len(generator_loss) >= 1 and all(math.isfinite(m.value) for m in generator_loss)
        artefacts = {a.path for a in client.list_artifacts(info["run_id"], "eval")}
        assert "eval/samples.png" in artefacts and "eval/report.json" in artefacts
