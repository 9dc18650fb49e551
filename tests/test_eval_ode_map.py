"""The PF-ODE map convergence check (``benchmark.py odemap``): the reference agrees with itself, a coarse
integration of a teacher with close codes does not, and the job reads the teacher from a run's config."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from dd2dist.conditions import Sampling
from dd2dist.config.loader import dump_yaml
from dd2dist.config.schema import ExperimentConfig, TeacherConfig
from dd2dist.eval.ode_map import ode_map_convergence
from dd2dist.teachers import LlamaGenConfig, build_family

REPO = Path(__file__).resolve().parents[1]
ARCH = LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=2, num_classes=3)


def _close_codes_teacher():
    torch.manual_seed(0)
    teacher = build_family("llamagen", llamagen=ARCH).freeze()
    with torch.no_grad():  # 16 codes in 4 tight clusters: the map needs many steps near the cluster boundaries
        emb = teacher.tokenizer.quantize.embedding.weight
        centres = torch.randn(4, emb.shape[1])
        emb.copy_(torch.nn.functional.normalize(centres.repeat(emb.shape[0] // 4, 1) + 0.1 * torch.randn_like(emb),
                                                dim=-1))
    return teacher


def test_agreement_is_one_at_the_reference_and_lower_for_a_coarse_integrator():
    teacher = _close_codes_teacher()
    report = ode_map_convergence(teacher, Sampling(guidance_scale=2.0), steps=(1, 64), reference_steps=64,
                                 samples=300)
    fine, coarse = report["steps"]["64"], report["steps"]["1"]
    assert fine["first_step"] == 1.0 and fine["all_tokens"] == 1.0
    assert coarse["all_tokens"] < 0.9 and coarse["first_step"] < 1.0
    assert len(coarse["per_position"]) == teacher.num_tokens


def test_the_job_scores_the_teacher_of_a_run(tmp_path):
    cfg = ExperimentConfig(teacher=TeacherConfig(family="llamagen", llamagen=ARCH,
                                                 sampling=Sampling(guidance_scale=2.0)))
    dump_yaml(cfg, tmp_path / "config.yaml")
    out = tmp_path / "odemap.json"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "odemap", "--run", str(tmp_path),
                           "--steps", "2,8", "--reference-steps", "16", "--samples", "60", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["steps"]) == {"2", "8"} and report["family"] == "llamagen" and report["samples"] == 60
    assert "all tokens" in proc.stdout
