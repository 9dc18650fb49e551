"""The train benchmark's exclusive time split and per-engine state bytes (pure, no Ray)."""

from __future__ import annotations

import time

import pytest
import torch

from dd2dist.bench.train import SplitTimer, engine_state_bytes


def test_inner_sections_pause_the_outer_one():
    timer = SplitTimer()
    with timer.section("outer"):
        time.sleep(0.02)
        with timer.section("inner"):
            time.sleep(0.05)
        time.sleep(0.02)
    timed = timer.wrap(lambda: time.sleep(0.01) or 7, "inner")
    assert timed() == 7
    assert timer.totals["inner"] == pytest.approx(0.06, abs=0.02)
    assert timer.totals["outer"] == pytest.approx(0.04, abs=0.02)  # the inner 50 ms is not counted twice
    timer.reset()
    assert not timer.totals


def test_state_bytes_count_parameters_and_adam_moments():
    from dd2dist.engine.optim import OptimSpec
    from dd2dist.engine.torch_engine import TorchEngine

    module = torch.nn.Linear(10, 4)  # 44 fp32 parameters
    engine = TorchEngine("generator", module, OptimSpec(lr=1e-3))
    assert engine_state_bytes(engine) == 44 * 4
    engine.set_trainable(True)
    engine.backward(module(torch.randn(3, 10)).sum())
    engine.step()
    # + exp_avg and exp_avg_sq per parameter (the scalar step counters add a few bytes)
    assert 44 * 12 <= engine_state_bytes(engine) <= 44 * 12 + 2 * 8
