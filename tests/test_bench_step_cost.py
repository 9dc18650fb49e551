"""The step-cost benchmark (``benchmark.py stepcost``): it builds each variant from the run's config with the given
overrides and times every loss of each (structure only: timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dd2dist.bench.step_cost import LOSSES, step_cost
from dd2dist.conditions import Sampling
from dd2dist.config.loader import dump_yaml
from dd2dist.config.schema import ExperimentConfig, StudentConfig, TeacherConfig
from dd2dist.teachers import LlamaGenConfig

REPO = Path(__file__).resolve().parents[1]
ARCH = LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=2, num_classes=3)


def _run_dir(tmp_path: Path) -> Path:
    teacher = TeacherConfig(family="llamagen", llamagen=ARCH, sampling=Sampling(guidance_scale=2.0))
    cfg = ExperimentConfig(teacher=teacher, student=StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    dump_yaml(cfg, tmp_path / "config.yaml")
    return tmp_path


def test_variants_are_built_from_the_runs_config_with_their_overrides(tmp_path, monkeypatch):
    import dd2dist.bench.step_cost as module

    built = []
    real = module._loss_calls
    monkeypatch.setattr(module, "_loss_calls",
                        lambda cfg, *a: built.append(cfg.student.posterior_head) or real(cfg, *a))
    report = step_cost(_run_dir(tmp_path), [(), ("student.posterior_head=true",)], repeats=2, iters=1, batch=2)
    assert built == [False, True]
    base, other = report["variants"]
    assert base["overrides"] == [] and other["overrides"] == ["student.posterior_head=true"]
    assert set(base["seconds"]) == set(LOSSES) and all(s > 0 for s in other["seconds"].values())
    assert base["ratio"] == {k: 1.0 for k in LOSSES} and report["batch"] == 2 and report["family"] == "llamagen"
    with pytest.raises(ValueError, match="at least one variant"):
        step_cost(tmp_path, [])


def test_the_job_writes_its_report(tmp_path):
    out = tmp_path / "stepcost.json"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "stepcost", "--run",
                           str(_run_dir(tmp_path)), "--variant", "student.posterior_head=false", "--variant",
                           "student.posterior_head=true,student.head_width=8", "--repeats", "1", "--iters", "1",
                           "--batch", "2", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [v["overrides"] for v in report["variants"]] == [["student.posterior_head=false"],
                                                            ["student.posterior_head=true", "student.head_width=8"]]
    assert "gts" in proc.stdout and report["cpus"] >= 1


def test_a_teacher_based_guidance_is_timed_with_the_teacher_pass_its_fcs_step_makes(tmp_path):
    """stage2.guidance_base=teacher: the FCS call runs the teacher on the generator's samples, as the training
    step does, and CSD takes the correction path (both counted, so the ratio is the option's cost)."""
    from dd2dist.bench.step_cost import _loss_calls
    from dd2dist.eval.fidelity import run_config
    from dd2dist.teachers import build_seeded_teacher

    run = _run_dir(tmp_path)
    for base, teacher_calls in (("none", 0), ("teacher", 1)):
        cfg = run_config(run, (f"stage2.guidance_base={base}",))
        teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
        seen = []

        def counted(*a, _real=teacher.log_probs, _seen=seen, **k):
            _seen.append(1)
            return _real(*a, **k)

        teacher.log_probs = counted
        calls = _loss_calls(cfg, teacher, 2, 0)
        calls["fcs"]().backward()
        assert len(seen) == teacher_calls, base
        calls["csd"]().backward()
