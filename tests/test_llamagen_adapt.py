"""Stage 0 (continuous-input adaptation) on a tiny LlamaGen: MLP regression onto tok_embeddings, AR fine-tuning."""

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.teachers.adapt import (
    drop_conditions,
    finetune_ar,
    input_mlp_relative_error,
    regress_input_mlp,
    with_mlp_adapter,
)
from dd2dist.teachers.arch import LlamaGenConfig
from dd2dist.teachers.llamagen import LlamaGenTeacher


def tiny_teacher(seed: int = 0) -> LlamaGenTeacher:
    torch.manual_seed(seed)
    t = LlamaGenTeacher(LlamaGenConfig())
    with torch.no_grad():  # spread the codes out (the released codebook init packs them near zero)
        t.tokenizer.quantize.embedding.weight.normal_()
    return t.freeze()


def test_with_mlp_adapter_keeps_every_other_weight():
    t = tiny_teacher()
    a = with_mlp_adapter(t)
    assert a.cfg.input_adapter == "mlp" and hasattr(a.gpt, "input_mlp")
    for k, v in t.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k


def test_regression_reaches_small_relative_error_and_reproduces_the_snap_teacher():
    t = tiny_teacher()
    a = with_mlp_adapter(t)
    untrained = input_mlp_relative_error(a)
    assert untrained > 0.5
    adam_only = regress_input_mlp(a, steps=200, lr=3e-3, solve_output_layer=False)
    assert adam_only < untrained
    err = regress_input_mlp(a, steps=50, lr=3e-3)
    assert err < 1e-3
    # independent check of the reported error
    with torch.no_grad():
        pred = a.gpt.input_mlp(a.codebook())
        target = t.gpt.tok_embeddings.weight
        assert abs(((pred - target).norm() / target.norm()).item() - err) < 1e-6
    # the adapted teacher on code vectors ~ the original teacher on ids
    assert not any(p.requires_grad for p in a.parameters())  # flags restored
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    cond = Cond(labels=torch.tensor([1, 2]))
    ref = t.log_probs(ids, cond)
    torch.testing.assert_close(a.log_probs(a.embed(ids), cond), ref, atol=1e-3, rtol=0)


def test_finetune_loss_decreases_and_only_the_gpt_changes():
    t = tiny_teacher()
    a = with_mlp_adapter(t)
    regress_input_mlp(a, steps=20, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    # a learnable toy language: each class has its own fixed token sequence
    labels = torch.arange(8) % 10
    seqs = torch.randint(0, 64, (10, 16), generator=g)[labels]
    batches = [(seqs, Cond(labels=labels))]
    tok_before = {k: v.clone() for k, v in a.tokenizer.state_dict().items()}
    emb_before = a.gpt.tok_embeddings.weight.clone()
    out_before = a.gpt.output.weight.clone()
    losses = finetune_ar(a, batches, steps=60, lr=1e-2, generator=torch.Generator().manual_seed(1))
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert all(torch.equal(a.tokenizer.state_dict()[k], v) for k, v in tok_before.items())
    assert torch.equal(a.gpt.tok_embeddings.weight, emb_before)  # unused under the mlp adapter
    assert not torch.equal(a.gpt.output.weight, out_before)


def test_condition_dropout_uses_the_null_condition():
    t = tiny_teacher()
    cond = Cond(labels=torch.arange(1000) % 10)
    dropped = drop_conditions(t, cond, 0.3, torch.Generator().manual_seed(0))
    changed = dropped.labels != cond.labels
    assert (dropped.labels[changed] == 10).all()
    assert 0.2 < changed.float().mean().item() < 0.4
    assert drop_conditions(t, cond, 0.0, None) is cond


def test_bad_arguments_raise():
    t = tiny_teacher()
    with pytest.raises(ValueError, match="input_mlp"):
        regress_input_mlp(t, steps=1, lr=1e-3)
    a = with_mlp_adapter(t)
    with pytest.raises(ValueError, match="ran out after 1 of 3"):
        finetune_ar(a, iter([(torch.zeros(1, 16, dtype=torch.long), Cond(labels=torch.tensor([0])))]), 3, 1e-3)
