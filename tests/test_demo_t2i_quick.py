"""`python jobs/demo.py --t2i --quick`: captions -> text-conditional teacher -> caption shards -> teacher-token shards
-> stage 1 + stage 2 on 2 DeepSpeed Ray workers -> per-prompt evaluation -> MLflow, at smoke-test size.

Quality numbers of the quick run are meaningless; this checks that every stage ran and that results.json holds,
per sampler, the prompt-adherence and fidelity figures the demo promises, well-formed and consistent with MLflow.
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


@pytest.fixture(scope="module")
def quick_t2i(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_t2i_quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    env.pop("RAY_ADDRESS", None)  # the demo must start its own embedded Ray
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--t2i", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out, json.loads((out / "results.json").read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_results_hold_adherence_and_fidelity_per_sampler(quick_t2i):
    out, results = quick_t2i
    samplers = results["samplers"]
    assert {"reference", "teacher", "one_step", "marginals"} <= set(samplers), sorted(samplers)
    for name in ("teacher", "one_step", "marginals"):
        r = samplers[name]
        for key in ("prompt_class_accuracy_seen", "prompt_class_accuracy_heldout", "prompt_property_agreement_seen",
                    "prompt_property_agreement_heldout"):
            assert _finite(r[key]) and 0.0 <= r[key] <= 1.0, (name, key, r.get(key))
        for prop in ("thickness", "slant"):  # agreement of each measured property with the caption
            assert 0.0 <= r[f"prompt_property_agreement_{prop}_heldout"] <= 1.0, (name, prop)
        assert _finite(r["fid_to_teacher"]) and r["fid_to_teacher"] >= 0, (name, r.get("fid_to_teacher"))
    # the floor is the second teacher draw's score, and dependence captured is measured between it and the marginals
    assert results["floor"]["fid_to_teacher"] == pytest.approx(samplers["teacher"]["fid_to_teacher"])
    assert samplers["teacher"]["dependence_captured"] == pytest.approx(1.0)
    assert samplers["marginals"]["dependence_captured"] == pytest.approx(0.0, abs=1e-9)
    assert results["prompts"]["heldout"] > 0 and results["prompts"]["num"] > results["prompts"]["heldout"]
    assert results["iteration"] > 0 and results["settings"]["quick"] is True
    for key in ("teacher", "captions_and_tokens", "stage1", "stage2", "evaluation"):
        assert results["seconds_by_step"][key] > 0, key
    v = results["verdict"]
    for kind in ("seen", "heldout"):
        diff = samplers["one_step"][f"prompt_class_accuracy_{kind}"] - samplers["reference"][
            f"prompt_class_accuracy_{kind}"]
        assert v[f"class_accuracy_one_step_minus_teacher_{kind}"] == pytest.approx(diff)
        assert v[f"class_accuracy_within_0.05_{kind}"] == (abs(diff) <= 0.05)
    assert v["dependence_captured"] == pytest.approx(samplers["one_step"]["dependence_captured"])


def test_mlflow_holds_the_evaluation(quick_t2i):
    from mlflow.tracking import MlflowClient

    out, results = quick_t2i
    stored = json.loads((out / "llamagen" / "mlflow_run.json").read_text())
    assert stored["run_id"] == results["mlflow_run_id"]
    run = MlflowClient(tracking_uri=stored["tracking_uri"]).get_run(stored["run_id"])
    logged = run.data.metrics
    one_step = results["samplers"]["one_step"]
    assert logged["eval/one_step/prompt_class_accuracy_heldout"] == pytest.approx(
        one_step["prompt_class_accuracy_heldout"])
    assert logged["eval/one_step/fid_to_teacher"] == pytest.approx(one_step["fid_to_teacher"])
    assert run.info.status == "FINISHED" and run.data.tags.get("demo") == "t2i"
    assert run.data.params["data.captions"] == str(out / "llamagen" / "captions")
    # training went to the same run: the generator's CSD losses are there
    client = MlflowClient(tracking_uri=stored["tracking_uri"])
    generator_loss = client.get_metric_history(stored["run_id"], "generator/loss")
    assert len(generator_loss) >= 1 and all(math.isfinite(m.value) for m in generator_loss)
    assert "eval/report.json" in {a.path for a in client.list_artifacts(stored["run_id"], "eval")}
