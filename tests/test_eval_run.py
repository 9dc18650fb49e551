"""jobs/evaluate.py on a tiny trained run: teacher, stage-1, one-step, snapped, refined; seeds; MLflow logging."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dd2dist.conditions import Cond, Sampling, cyclic_labels
from dd2dist.config import dump_yaml
from dd2dist.config.schema import (
    EvalConfig,
    ExperimentConfig,
    Stage1Config,
    Stage2Config,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)
from dd2dist.data.digits import to_uint8
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.eval.run_eval import _generate, evaluate_run, log_to_mlflow, per_sample_noise
from dd2dist.teachers import build_seeded_teacher
from dd2dist.train import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a tiny training run + MLflow's SQLite set-up: ~25 s of CPU, more on a shared box


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = ExperimentConfig(
        name="evaltest", output_dir=str(root / "evaltest"),
        teacher=TeacherConfig(family="var", sampling=Sampling(guidance_scale=1.0, guidance_schedule="var_linear")),
        student=StudentConfig(head_width=16, head_depth=1, time_embed_dim=8),
        stage1=Stage1Config(head_only_steps=0, steps=2, batch_size=4),
        stage2=Stage2Config(generator_steps=2, guidance_per_generator=1, fcs_samples=1, batch_size=4),
        tracking=TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress_every_s=0.0),
        eval=EvalConfig(num_samples=20, batch_size=10, refine_steps=(2,)),
    )
    import os

    os.environ["DD2DIST_CACHE_DIR"] = str(root / "cache")
    tr = Trainer(cfg, build_seeded_teacher(cfg.teacher, cfg.seed), TorchEngineFactory())
    tr.fit(max_iterations=2)  # stage 1 done: keep its student as the stage-1 model
    run_dir = Path(cfg.output_dir)
    (run_dir / "export").mkdir(parents=True)
    torch.save(tr.student_state_dict(), run_dir / "export" / "stage1_student.pt")
    tr.fit()
    tr.export_generator(run_dir / "export")
    dump_yaml(cfg, run_dir / "config.yaml")
    report = evaluate_run(cfg, log=lambda s: None)
    return cfg, report


def test_every_method_is_evaluated_with_its_settings(run):
    cfg, report = run
    res = report["results"]
    assert set(res) == {"teacher", "stage1", "one_step", "one_step_snapped", "refined_2"}
    for name, r in res.items():
        assert r["num_generated"] == 20 and r["fid"] >= 0 and 0 <= r["class_consistency"] <= 1
        assert r["sampling"]["method"] == name and Path(r["grid"]).is_file()
        assert r["feature_space"]["extractor"] == "dd2dist-digits-classifier"
    assert res["teacher"]["sampling"]["teacher_sampling"]["guidance_scale"] == 1.0
    assert res["refined_2"]["sampling"]["refine_steps"] == 2
    saved = json.loads(Path(report["report_path"]).read_text())
    assert saved["results"]["one_step"]["fid"] == res["one_step"]["fid"]
    export = Path(cfg.output_dir) / "export" / "generator.safetensors"
    assert all(res[m]["sampling"]["generator"] == str(export) for m in ("one_step", "one_step_snapped", "refined_2"))


def test_one_step_samples_the_named_export(run, tmp_path):
    """generator_file (jobs/evaluate.py --generator) picks another export of the run, e.g. an ema_compare EMA's."""
    from safetensors.torch import load_file, save_file

    cfg, report = run
    export = Path(cfg.output_dir) / "export"
    state = load_file(str(export / "generator.safetensors"))
    # a zero output layer: the head predicts v = 0, so the generator returns its noise unchanged
    state = {k: torch.zeros_like(v) if k.startswith("head.final.linear.") else v for k, v in state.items()}
    save_file(state, str(export / "generator_zero_head.safetensors"))
    other = evaluate_run(cfg, methods=("one_step",), out_dir=tmp_path, log=lambda s: None,
                         generator_file="generator_zero_head.safetensors")["results"]["one_step"]
    assert other["sampling"]["generator"] == str(export / "generator_zero_head.safetensors")
    assert other["fid"] != report["results"]["one_step"]["fid"]
    with pytest.raises(FileNotFoundError, match="generator_missing.safetensors"):
        evaluate_run(cfg, methods=("one_step",), out_dir=tmp_path, log=lambda s: None,
                     generator_file="generator_missing.safetensors")


def test_one_step_images_follow_per_sample_seeds(run):
    cfg, _ = run
    from dd2dist.eval.sampling import load_generator

    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    net, _ = load_generator(Path(cfg.output_dir) / "export")
    labels = torch.arange(12) % 10
    a, a_ids = _generate("one_step", 12, labels, teacher, {"one_step": net}, cfg, 5, batch_size=12)
    b, b_ids = _generate("one_step", 12, labels, teacher, {"one_step": net}, cfg, 5, batch_size=5)
    assert torch.equal(a, b) and torch.equal(a_ids, b_ids)  # independent of the batch size
    # sample 7, recomputed by hand from its own seed
    eps = torch.randn((teacher.num_tokens, teacher.embed_dim), generator=torch.Generator().manual_seed(5 + 7))
    assert torch.equal(per_sample_noise(1, eps.shape, 5, 7)[0], eps)
    with torch.no_grad():
        img = to_uint8(teacher.decode(net.generate(eps[None], Cond(labels=labels[7:8])).float()))
    assert (img[0].int() - a[7].int()).abs().max() <= 1


def test_token_marginal_tv_is_measured_on_the_evaluated_tokens(run):
    """With a reference, every method reports the TV of the very tokens it was scored on: the teacher against
    counts of its own evaluation tokens gives exactly 0, the one-step generator what its snapped ids give."""
    cfg, _ = run
    from dd2dist.eval.sampling import load_generator
    from dd2dist.eval.token_marginals import class_position_counts, marginal_tv

    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    net, _ = load_generator(Path(cfg.output_dir) / "export")
    n, seed_base = cfg.eval.num_samples, int(cfg.seed) * 1_000_003 + 7919
    labels = cyclic_labels(n, teacher.num_classes)
    nets = {"one_step": net}
    _, teacher_ids = _generate("teacher", n, labels, teacher, nets, cfg, seed_base, cfg.eval.batch_size)
    _, one_step_ids = _generate("one_step", n, labels, teacher, nets, cfg, seed_base, cfg.eval.batch_size)
    reference = class_position_counts(teacher_ids, labels, teacher.num_classes, teacher.vocab_size)
    report = evaluate_run(cfg, methods=("teacher", "one_step"), log=lambda s: None, token_reference=reference,
                          out_dir=Path(cfg.output_dir) / "eval_tv")
    res = report["results"]
    assert res["teacher"]["token_marginal_tv"]["mean"] == 0.0
    expected = marginal_tv(class_position_counts(one_step_ids, labels, teacher.num_classes, teacher.vocab_size),
                           reference)
    assert res["one_step"]["token_marginal_tv"] == expected
    assert len(expected["per_position"]) == teacher.num_tokens


def test_metrics_are_logged_to_mlflow(run):
    from mlflow.tracking import MlflowClient

    cfg, report = run
    run_id = log_to_mlflow(cfg, report)
    data = MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_run(run_id).data
    assert data.metrics["eval/one_step/fid"] == pytest.approx(report["results"]["one_step"]["fid"])
    assert "eval/teacher/class_consistency" in data.metrics


def test_job_cli(run, tmp_path):
    cfg, _ = run
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    config = str(Path(cfg.output_dir) / "config.yaml")
    assert job.main(["--config", config, "--methods", "teacher", "--num-samples", "10", "--no-tracking",
                     "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "report.json").read_text())["results"].keys() == {"teacher"}
    # --tokens: the token-marginal TV against teacher-token shards (here: shards of the teacher's own samples)
    from dd2dist.data import ShardSpec, TokenSample, TokenShardWriter

    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    labels = cyclic_labels(40, teacher.num_classes)
    ids = teacher.sample(Cond(labels=labels), cfg.teacher.sampling, generator=torch.Generator().manual_seed(1))
    spec = ShardSpec(teacher_id="test", family=teacher.family, vocab_size=teacher.vocab_size,
                     token_shape=(teacher.num_tokens,), num_classes=teacher.num_classes)
    with TokenShardWriter(tmp_path / "tokens", spec, maxcount=25) as writer:
        for i, (row, y) in enumerate(zip(ids.numpy(), labels.tolist())):
            writer.write_sample(TokenSample(key=f"s{i:09d}", tokens=row, spec=spec, label=int(y)))
    assert job.main(["--config", config, "--methods", "teacher,one_step", "--num-samples", "10", "--no-tracking",
                     "--out", str(tmp_path / "tv"), "--tokens", str(tmp_path / "tokens")]) == 0
    res = json.loads((tmp_path / "tv" / "report.json").read_text())["results"]
    assert all(0.0 <= res[m]["token_marginal_tv"]["mean"] <= 1.0 for m in ("teacher", "one_step"))
    assert job.main(["--config", config, "--methods", "teacher", "--no-tracking", "--tokens",
                     str(tmp_path / "no_shards")]) == 2  # no shards there: a clear error, not a crash
    # a run without an export: asking for the one-step generator is a clear error (exit 2)
    assert job.main(["--config", config, "--set", f"output_dir={tmp_path / 'empty'}", "--methods", "one_step",
                     "--no-tracking"]) == 2
    assert job.main(["--config", config, "--set", "eval.refine_steps=[]", "--methods", "refined",
                     "--no-tracking"]) == 2


def test_compact_head_is_fitted_evaluated_on_the_same_noise_and_fitted_by_its_job(run, tmp_path):
    """jobs/compact_head.py writes the compact head beside the generator; evaluation samples it as
    ``one_step_compact`` on one_step's noise, so a compact head that starts as the full head (same geometry, full
    rank) and takes no step scores exactly what one_step scores."""
    from dataclasses import replace

    from dd2dist.eval.compact import export_compact_head
    from dd2dist.nets.compact_head import COMPACT_HEAD_FILE

    cfg, report = run
    export = Path(cfg.output_dir) / "export"
    try:
        exact = replace(cfg, compact_head=replace(cfg.compact_head, width=16, depth=1, rank=0, steps=0))
        fit = export_compact_head(exact, log=lambda s: None)
        assert fit["relative_error_before"] < 1e-10 and Path(fit["path"]) == export / COMPACT_HEAD_FILE
        res = evaluate_run(exact, methods=("one_step", "one_step_compact"), out_dir=tmp_path / "exact",
                           log=lambda s: None)["results"]
        assert res["one_step_compact"]["fid"] == pytest.approx(res["one_step"]["fid"], rel=1e-4)
        assert res["one_step_compact"]["sampling"]["compact_head"]["width"] == "16"
        assert res["one_step_compact"]["sampling"]["seed_range"] == res["one_step"]["sampling"]["seed_range"]

        spec = importlib.util.spec_from_file_location("compact_job", REPO / "jobs" / "compact_head.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        config = str(Path(cfg.output_dir) / "config.yaml")
        assert job.main(["--config", config, "--set", "compact_head.width=8", "--set", "compact_head.steps=20",
                         "--set", "compact_head.batch_rows=256", "--set", "compact_head.pool_sequences=32"]) == 0
        fitted = json.loads((export / COMPACT_HEAD_FILE).with_suffix(".json").read_text())
        assert fitted["spec"] == {"width": 8, "depth": 1, "rank": 0} and fitted["steps"] == 20
        res = evaluate_run(cfg, methods=("one_step_compact",), out_dir=tmp_path / "small", log=lambda s: None)
        assert res["results"]["one_step_compact"]["sampling"]["compact_head"]["width"] == "8"
        # no export there: a clear error naming it (exit 2), nothing written
        assert job.main(["--config", config, "--set", f"output_dir={tmp_path / 'empty'}"]) == 2
    finally:
        for suffix in (".safetensors", ".json"):
            (export / COMPACT_HEAD_FILE).with_suffix(suffix).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="jobs/compact_head.py"):
        evaluate_run(cfg, methods=("one_step_compact",), out_dir=tmp_path / "none", log=lambda s: None)
