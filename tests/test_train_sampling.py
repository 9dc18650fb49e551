"""One-step and teacher-refined sampling, and the exported-generator round trip."""

import pytest
import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.config.schema import (
    ExperimentConfig,
    Stage1Config,
    Stage2Config,
    StudentConfig,
    TeacherConfig,
)
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.eval import load_generator, one_step, teacher_refined
from dd2dist.nets import StudentNet
from dd2dist.teachers import VARConfig, VARVQConfig, build_family
from dd2dist.train import Trainer

ARCH = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4,
                 tokenizer=VARVQConfig(vocab_size=16, embed_dim=4))
SAMPLING = Sampling(guidance_scale=1.0, guidance_schedule="var_linear")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = build_family("var", var=ARCH).freeze()
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return teacher, net.eval().requires_grad_(False)


def test_one_step_shapes_and_nearest_codes(nets):
    teacher, net = nets
    cond = Cond(labels=torch.tensor([0, 1, 2]))
    q, ids = one_step(net, cond, torch.Generator().manual_seed(3))
    assert q.shape == (3, teacher.num_tokens, teacher.embed_dim) and ids.shape == (3, teacher.num_tokens)
    d = torch.cdist(q.reshape(-1, teacher.embed_dim), teacher.codebook())
    assert torch.equal(ids.reshape(-1), d.argmin(-1))
    q2, _ = one_step(net, cond, torch.Generator().manual_seed(3))
    assert torch.equal(q, q2)


def test_teacher_refined_k1_is_one_step(nets):
    teacher, net = nets
    cond = Cond(labels=torch.tensor([3, 1]))
    q, ids = one_step(net, cond, torch.Generator().manual_seed(5))
    x, ids_r = teacher_refined(net, teacher, cond, 1, SAMPLING, torch.Generator().manual_seed(5))
    assert torch.equal(x, q) and torch.equal(ids_r, ids)


def test_teacher_refined_all_steps_keeps_first_step_and_writes_codes(nets):
    teacher, net = nets
    cond = Cond(labels=torch.arange(4))
    S = len(teacher.steps)
    q, ids = one_step(net, cond, torch.Generator().manual_seed(7))
    x, ids_r = teacher_refined(net, teacher, cond, S, SAMPLING, torch.Generator().manual_seed(7))
    first = teacher.steps[0]
    assert torch.equal(x[:, first], q[:, first]) and torch.equal(ids_r[:, first], ids[:, first])
    rest = slice(first.stop, None)
    assert ((ids_r[:, rest] >= 0) & (ids_r[:, rest] < teacher.vocab_size)).all()
    assert torch.equal(x[:, rest], teacher.codebook()[ids_r[:, rest]])
    with pytest.raises(ValueError, match="k must be"):
        teacher_refined(net, teacher, cond, S + 1, SAMPLING)


def test_teacher_refined_last_step_follows_teacher_conditional(nets):
    """The re-sampled last scale is distributed as the teacher's conditional given the sequence before it."""
    teacher, net = nets
    B = 3000
    cond = Cond(labels=torch.full((B,), 2))
    x, ids = teacher_refined(net, teacher, cond, 2, SAMPLING, torch.Generator().manual_seed(11))
    last = teacher.steps[-1]
    probs = teacher.log_probs(x, cond, SAMPLING)[:, last].exp()  # rows of the last step see only earlier steps
    expected = probs.mean(0)  # (n, V), averaged over the prefixes actually drawn
    counts = torch.nn.functional.one_hot(ids[:, last], teacher.vocab_size).float().mean(0)
    tv = 0.5 * (counts - expected).abs().sum(-1)
    assert tv.max() < 0.06, tv


def test_export_and_load_generator_round_trip(tmp_path):
    cfg = ExperimentConfig(
        stages=("stage1", "stage2"),
        teacher=TeacherConfig(family="var", var=ARCH, sampling=SAMPLING),
        student=StudentConfig(head_width=16, head_depth=1, time_embed_dim=8),
        stage1=Stage1Config(head_only_steps=0, steps=2, batch_size=4),
        stage2=Stage2Config(generator_steps=2, guidance_per_generator=1, fcs_samples=1, batch_size=4),
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, build_family("var", var=ARCH), TorchEngineFactory())
    tr.fit()
    path = tr.export_generator(tmp_path / "export")
    assert path.is_file() and (tmp_path / "export" / "config.yaml").is_file()
    net, loaded_cfg = load_generator(tmp_path / "export")
    assert loaded_cfg.stage2 == cfg.stage2
    # the exported weights are the EMA ones, and the trainer's generator weights are left untouched
    raw = tr.engines["generator"].full_state_dict()
    ema = tr.generator_state_dict(use_ema=True)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert all(torch.equal(raw[k], v) for k, v in tr.engines["generator"].full_state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
    cond = Cond(labels=torch.tensor([0, 1]))
    q, _ = one_step(net, cond, torch.Generator().manual_seed(0))
    ref = StudentNet(build_family("var", var=ARCH).freeze(), cfg.student)
    ref.load_state_dict(ema)
    q_ref, _ = one_step(ref.eval(), cond, torch.Generator().manual_seed(0))
    assert torch.equal(q, q_ref)
