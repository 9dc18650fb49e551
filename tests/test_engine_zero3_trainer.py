"""The smoke_var_deepspeed recipe (stage 1 head-only + full, stage 2, performance alignment) with ZeRO-3 generator,
guidance and stage-1 student, on 2 gloo ranks (the Trainer on DeepSpeed engines, without Ray): stopped after stage 1
and in stage 2, resumed from its checkpoints each time, it ends with the same generator, EMA generator and guidance
as an uninterrupted ZeRO-0 run; each rank holds half of each trainable net; the stage-1 checkpoint consolidates with
zero_to_fp32 (what dd2dist.eval reads) to the trainer's own consolidated student.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dd2dist.launch.local_ranks import run_ranks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml")
STAGE1_END = 6  # head-only 2 + full 4 iterations
STOP_IN_STAGE2 = 14


def _trainer(tmp: str, zero: int, rank: int, world: int):
    from dd2dist.config import load_config
    from dd2dist.engine.deepspeed_factory import DeepSpeedEngineFactory
    from dd2dist.teachers import build_teacher
    from dd2dist.train import Trainer

    cfg = load_config(TINY, [f"engine.zero_stage_generator={zero}", f"engine.zero_stage_guidance={zero}",
                             f"output_dir={tmp}/zero{zero}"])
    torch.manual_seed(cfg.seed)  # the random-init teacher, equal on every rank (as the Ray worker does)
    teacher = build_teacher(cfg.teacher)
    return Trainer(cfg, teacher, DeepSpeedEngineFactory(cfg.engine), rank=rank, world_size=world)


def _final(trainer) -> dict:
    from dd2dist.engine.param_bytes import param_bytes_ratio

    return {
        "iteration": trainer.state.iteration,
        "generator": trainer.generator_state_dict(use_ema=False),
        "ema": trainer.generator_state_dict(use_ema=True),
        "guidance": trainer.engines["guidance"].full_state_dict(),
        "ratios": [param_bytes_ratio(trainer.engines[name]) for name in ("generator", "guidance")],
        "skipped": dict(trainer.state.skipped),
    }


def _worker(rank: int, world: int, tmp: str) -> dict:
    from dd2dist.eval.run_eval import load_student_weights

    out = {}
    root = f"{tmp}/ckpt0"
    straight = _trainer(tmp, 0, rank, world)
    straight.fit(max_iterations=STAGE1_END)
    out["student0"] = straight.student_state_dict()
    straight.fit(checkpoint_dir=root, checkpoint_every=1000)
    out[0] = _final(straight)

    root = f"{tmp}/ckpt3"
    first = _trainer(tmp, 3, rank, world)
    first.fit(checkpoint_dir=root, checkpoint_every=1000, max_iterations=STAGE1_END)
    out["student3"] = first.student_state_dict()
    out["student3_ratio"] = _ratio(first.engines["student"])
    step_dir = Path(root) / f"step_{STAGE1_END:08d}"
    out["student3_zero_to_fp32"] = load_student_weights(step_dir) if rank == 0 else None
    second = _trainer(tmp, 3, rank, world)
    assert second.resume_latest(root) == step_dir
    second.fit(checkpoint_dir=root, checkpoint_every=1000, max_iterations=STOP_IN_STAGE2)
    third = _trainer(tmp, 3, rank, world)
    assert third.resume_latest(root).name == f"step_{STOP_IN_STAGE2:08d}"
    third.fit(checkpoint_dir=root, checkpoint_every=1000)
    out[3] = _final(third)
    return out


def _ratio(engine) -> float:
    from dd2dist.engine.param_bytes import param_bytes_ratio

    return param_bytes_ratio(engine)


def _assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert set(a) == set(b), what
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=atol,
                                   msg=lambda m, k=key: f"{what} {k}: {m}")


def test_smoke_var_deepspeed_with_zero3_students_resumes_and_equals_zero0(tmp_path):
    per_rank = run_ranks(_worker, 2, str(tmp_path), timeout=240)
    for rank, out in enumerate(per_rank):
        z0, z3 = out[0], out[3]
        assert z0["iteration"] == z3["iteration"] == 32 and z0["skipped"] == z3["skipped"] == {}
        # measured: <= 1.2e-7 apart after 32 iterations (fp32 summation order); the gradients themselves are
        # compared at rel 1e-5 in test_engine_zero3.py
        _assert_close(out["student3"], out["student0"], 1e-6, "stage-1 student")
        for net in ("generator", "ema", "guidance"):
            _assert_close(z3[net], z0[net], 1e-6, net)
        assert z0["ratios"] == [1.0, 1.0]
        for ratio in (*z3["ratios"], out["student3_ratio"]):
            assert ratio <= 0.55 and math.isclose(ratio, 0.5, abs_tol=0.01)
        if rank == 0:
            fp32 = out["student3_zero_to_fp32"]
            _assert_close({k: fp32[k] for k in out["student3"]}, out["student3"], 0.0, "zero_to_fp32")
