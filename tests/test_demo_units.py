"""Fast checks of jobs/demo.py's own pieces: recipes, the product-of-marginals baseline, the results tables."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import demo  # noqa: E402


@pytest.mark.parametrize("family", demo.FAMILIES)
@pytest.mark.parametrize("quick", [False, True])
def test_recipes_load_as_two_deepspeed_workers_with_demo_paths(family, quick, tmp_path):
    cfg = demo.family_config(family, quick, None, tmp_path / family, check_paths=False)
    assert cfg.teacher.family == family and cfg.name == f"demo-{family}{'-quick' if quick else ''}"
    assert cfg.output_dir == str(tmp_path / family)
    assert cfg.launch.num_workers == 2 and cfg.engine.kind == "deepspeed"
    # the paper's performance alignment is for VAR only (method.md §6.3)
    assert cfg.stages == (("stage1", "stage2", "alignment") if family == "var" else ("stage1", "stage2"))
    assert cfg.eval.num_samples % 10 == 0
    # the teacher architecture is the digits teacher's, so the cached teacher checkpoint fits
    digits = demo.teacher_config(family)
    assert cfg.teacher.arch == digits.teacher.arch and cfg.teacher.sampling == digits.teacher.sampling
    expected_stage1 = cfg.stage1.head_only_steps + cfg.stage1.steps
    assert demo.stage1_iterations(cfg) == expected_stage1 > 0


def test_bad_eval_sample_count_is_refused_naming_the_key(tmp_path, monkeypatch):
    bad = tmp_path / "var.yaml"
    bad.write_text(f"defaults: [{REPO / 'configs/demo/var_quick.yaml'}]\neval: {{num_samples: 45}}\n")
    monkeypatch.setattr(demo, "recipe_path", lambda family, quick: bad)
    with pytest.raises(ValueError, match=r"eval\.num_samples \(45\)"):
        demo.family_config("var", True, None, tmp_path / "var", check_paths=False)


def _write_token_shards(out: Path, ids: np.ndarray, labels: np.ndarray, vocab: int) -> None:
    from dd2dist.data import ShardSpec, TokenSample, TokenShardWriter

    spec = ShardSpec(teacher_id="var-own-test", family="var", vocab_size=vocab, token_shape=(ids.shape[1],),
                     num_classes=3)
    with TokenShardWriter(out, spec, maxcount=50) as writer:
        for i, (row, y) in enumerate(zip(ids, labels)):
            writer.write_sample(TokenSample(key=f"s{i:09d}", tokens=row, spec=spec, label=int(y)))


def test_marginal_sampler_draws_each_position_from_its_class_marginal(tmp_path):
    rng = np.random.default_rng(0)
    vocab, n_tokens, n = 5, 3, 120
    labels = np.arange(n) % 3
    # class c: position p is always code (c + p) % vocab, except position 2, uniform over {0, 1}
    ids = np.stack([(labels + p) % vocab for p in range(n_tokens)], axis=1)
    ids[:, 2] = rng.integers(0, 2, n)
    _write_token_shards(tmp_path, ids, labels, vocab)
    sample = demo.marginal_sampler(tmp_path, num_classes=3, vocab_size=vocab)
    y = torch.arange(3).repeat_interleave(400)
    out = sample(y, torch.Generator().manual_seed(0))
    assert out.shape == (1200, n_tokens)
    for c in range(3):
        rows = out[y == c]
        assert (rows[:, 0] == c).all() and (rows[:, 1] == (c + 1) % vocab).all()
        freq1 = (rows[:, 2] == 1).float().mean().item()
        counted = (ids[labels == c, 2] == 1).mean()
        assert abs(freq1 - counted) < 0.08  # 400 draws: ~3 standard deviations
        assert set(rows[:, 2].tolist()) <= {0, 1}
    # positions are independent given the class: position 2 does not follow position 0 or 1
    assert len({tuple(r) for r in out[y == 0].tolist()}) == 2


def _metrics(fid: float, cc: float) -> dict:
    return {"fid": fid, "precision": 0.5, "recall": 0.25, "isc_mean": 3.0, "class_consistency": cc,
            "sampling": {"method": "x"}, "grid": None, "num_generated": 20}


def test_family_summary_and_tables_report_ratio_and_gap():
    evaluation = {"results": {"teacher": _metrics(10.0, 0.9), "stage1": _metrics(40.0, 0.5),
                              "one_step": _metrics(14.0, 0.88)},
                  "floor": {"fid": 5.0, "classifier_heldout_accuracy": 0.98}, "feature_space": {}}
    train = {"stage2": {"export": "/x/generator.safetensors", "iteration": 10}, "stage1_file": "/x/s1.safetensors"}
    cfg = demo.family_config("var", True, None, Path("/tmp/demo-units/var"), check_paths=False)
    run = {"seconds_by_step": {"teacher": 1.0, "tokens": 2.0, "stage1": 3.0, "stage2": 4.0, "evaluation": 5.0},
           "token_shards": {}, "mlflow": {"run_id": "r", "tracking_uri": "u"}, "grid": "g.png"}
    s = demo.family_summary(evaluation, train, {"checkpoint": "t.pt", "reused": True}, cfg, 16.0, run)
    assert s["fid_one_step"] == 14.0 and s["fid_stage1"] == 40.0 and s["fid_teacher"] == 10.0
    assert s["fid_ratio_one_step"] == pytest.approx(1.4) and s["targets"]["fid_ratio_met"]
    assert s["class_consistency_gap"] == pytest.approx(0.02) and s["targets"]["class_consistency_met"]
    assert s["sampling"]["num_samples"] == cfg.eval.num_samples
    assert s["sampling"]["teacher"]["cfg"] == cfg.teacher.sampling.cfg
    table = demo.markdown_tables({"var": s})
    assert "| var | DD2 one-step | 14.000 | 0.500 | 0.250 | 3.00 | 0.880 |" in table
    assert "| var | 1 (reused) | 2 | 3 | 4 | - | 5 | 16 |" in table  # no compact head fitted: its column is "-"
    assert "fid_ratio_one_step_compact" not in s and "fid_ratio_met_compact" not in s["targets"]
    # with the compact sampling head: its ratio, gap and verdicts beside the trained head's, its fit time in the table
    evaluation["results"]["one_step_compact"] = _metrics(17.0, 0.84)
    run["seconds_by_step"]["compact_head"] = 6.0
    s = demo.family_summary(evaluation, train, {"checkpoint": "t.pt", "reused": True}, cfg, 16.0, run)
    assert s["fid_ratio_one_step_compact"] == pytest.approx(1.7) and not s["targets"]["fid_ratio_met_compact"]
    assert s["class_consistency_gap_compact"] == pytest.approx(0.06)
    assert not s["targets"]["class_consistency_met_compact"]
    table = demo.markdown_tables({"var": s})
    assert "| var | DD2 one-step, compact head | 17.000 |" in table
    assert "| var | 1 (reused) | 2 | 3 | 4 | 6 | 5 | 16 |" in table


def test_eval_only_accepts_only_eval_overrides():
    assert demo.extra_eval_overrides(("eval.num_samples=100",)) == ["eval.num_samples=100"]
    with pytest.raises(ValueError, match="stage2.generator_steps"):
        demo.extra_eval_overrides(("eval.batch_size=10", "stage2.generator_steps=5"))
