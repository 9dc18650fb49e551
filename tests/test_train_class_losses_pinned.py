"""Class-conditional runs draw exactly the labels they drew before captions became a condition source.

The losses below were recorded on the trainer before dd2dist/train/condition_source.py existed (tiny LlamaGen
smoke recipe, one CPU thread): balanced label cycles with PF-ODE regression pairs and the regression anchor, and
uniformly drawn labels. A different label, noise or pair draw moves them by far more than the tolerance, which
only allows for another CPU's float summation order.
"""

from pathlib import Path

import pytest
import torch

from dd2dist.config import load_config
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.teachers import build_seeded_teacher
from dd2dist.train import OnStep, Trainer
from dd2dist.train.condition_source import ClassLabels

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "smoke_llamagen_torch.yaml"
TINY = ["stage1.steps=3", "stage1.warmup_steps=1", "stage1.batch_size=4", "stage2.batch_size=4",
        "stage2.generator_steps=2", "stage2.guidance_per_generator=1", "stage2.warmup_guidance_steps=2",
        "stage2.fcs_samples=2", "student.head_width=16", "student.head_depth=1", "student.time_embed_dim=8"]
VARIANTS = {
    "balanced_ode": ["stage2.ode_init_steps=2", "stage2.ode_pairs_per_call=2", "stage2.ode_steps=2",
                     "stage2.regression_weight=0.5"],
    "random_labels": ["data.label_mode=random"],
}
RECORDED = {
    "balanced_ode": [
        {'student/loss': 0.6960893273353577},
        {'student/loss': 0.8959262371063232},
        {'student/loss': 0.8327946662902832},
        {'generator/regression_loss': 4.9947967529296875},
        {'generator/regression_loss': 5.637452125549316},
        {'guidance/loss': 1.8860667943954468},
        {'generator/loss': -1.3602869510650635, 'generator/regression_loss': 4.583010196685791},
        {'guidance/loss': 1.9559003114700317},
        {'generator/loss': -1.3275302648544312, 'generator/regression_loss': 4.780355930328369},
    ],
    "random_labels": [
        {'student/loss': 0.697993278503418},
        {'student/loss': 0.8952623605728149},
        {'student/loss': 0.8346834778785706},
        {'guidance/loss': 2.0521531105041504},
        {'generator/loss': -1.6934211254119873},
        {'guidance/loss': 1.8844635486602783},
        {'generator/loss': -1.384100317955017},
    ],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_class_conditional_losses_equal_the_recorded_ones(variant, tmp_path):
    cfg = load_config(RECIPE, [*TINY, *VARIANTS[variant], f"output_dir={tmp_path}"])
    losses = []
    trainer = Trainer(cfg, build_seeded_teacher(cfg.teacher, cfg.seed), TorchEngineFactory(),
                      callbacks=[OnStep(lambda tr, m: losses.append({k: v for k, v in m.items()
                                                                      if k.endswith("loss")}))])
    assert isinstance(trainer.batches.conditions, ClassLabels)
    trainer.fit()
    assert [sorted(step) for step in losses] == [sorted(step) for step in RECORDED[variant]]
    for got, want in zip(losses, RECORDED[variant]):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_balanced_labels_continue_the_cycle_over_micro_steps_and_ranks():
    """The cycle the recorded runs depend on: step, micro-step and rank take consecutive windows."""
    rank1 = ClassLabels(10, "balanced", seed=0, rank=1, world_size=2, grad_accum=2, device=torch.device("cpu"))
    got = rank1.draw(4, iteration=3, micro=1, purpose="unused").labels
    slot = (3 * 2 + 1) * 2 + 1
    assert got.tolist() == [(slot * 4 + i) % 10 for i in range(4)]
