"""Units of the digits teacher training: VQ losses / straight-through, AR cross-entropy, overfitting a batch."""

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.data.digits import digits_split
from dd2dist.digits.ar_training import ar_loss, train_ar, transformer_parameters
from dd2dist.digits.recipe import QUICK, TeacherRecipe
from dd2dist.digits.vq_training import var_vq_step, vq16_step
from dd2dist.teachers import build_family
from dd2dist.teachers.arch import LlamaGenConfig, VARConfig, VARVQConfig, VQ16Config


@pytest.fixture(scope="module")
def batch():
    d = digits_split("train")
    return d.images[:16], d.labels[:16]


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_vq_step_straight_through_and_codebook_gradients(family, batch):
    torch.manual_seed(0)
    teacher = build_family(family, var=VARConfig(), llamagen=LlamaGenConfig())
    tok = teacher.tokenizer
    step = var_vq_step if family == "var" else vq16_step
    loss, parts, ids, _ = step(tok, batch[0], 0.25)
    loss.backward()
    # reconstruction gradients reach the encoder only through the straight-through estimator
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0
    assert set(parts) == {"rec", "codebook", "commit"} and parts["codebook"] == pytest.approx(parts["commit"])
    # the ids the loss used are the tokenizer's own inference-path ids
    with torch.no_grad():
        assert torch.equal(ids, teacher.encode(batch[0]))


def test_vq_steps_reduce_reconstruction_error(batch):
    torch.manual_seed(0)
    small = VQ16Config(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
    tok = build_family("llamagen", llamagen=LlamaGenConfig(tokenizer=small)).tokenizer
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        loss, parts, _, _ = vq16_step(tok, batch[0][:8], 0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = parts["rec"] if first is None else first
    assert parts["rec"] < 0.6 * first


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_ar_loss_is_the_cross_entropy_of_the_teacher_forced_log_probs(family):
    torch.manual_seed(0)
    teacher = build_family(family)
    ids = torch.randint(0, teacher.vocab_size, (3, teacher.num_tokens))
    labels = torch.tensor([0, 4, 10])  # 10 = the null class
    lp = teacher.log_probs(ids, Cond(labels=labels))  # independent path: log-softmax, then gather
    expected = -lp.gather(-1, ids[..., None]).mean()
    assert ar_loss(teacher, ids, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ar_training_overfits_a_few_sequences_and_leaves_the_tokenizer_alone():
    torch.manual_seed(0)
    teacher = build_family("var")
    tok_before = {k: v.clone() for k, v in teacher.tokenizer.state_dict().items()}
    ids = torch.randint(0, teacher.vocab_size, (8, teacher.num_tokens))
    labels = torch.arange(8)
    before = ar_loss(teacher, ids, labels).item()
    recipe = TeacherRecipe(ar_epochs=60, ar_batch_size=8, ar_lr=3e-3, label_drop=0.0)
    info = train_ar(teacher, ids, labels, recipe, log=lambda s: None)
    assert info["train_ce"] < 0.5 * before
    assert all(torch.equal(v, teacher.tokenizer.state_dict()[k]) for k, v in tok_before.items())
    assert not any(p is q for p in transformer_parameters(teacher) for q in teacher.tokenizer.parameters())


def test_recipe_validation():
    with pytest.raises(ValueError, match="label_drop"):
        TeacherRecipe(label_drop=1.0)
    with pytest.raises(ValueError, match="ar_batch_size"):
        TeacherRecipe(ar_batch_size=0)
    assert QUICK.vq_epochs == 1


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_dead_codes_are_reseeded_from_encoder_vectors(family, batch):
    from dd2dist.digits.vq_training import train_tokenizer

    small_var = VARConfig(tokenizer=VARVQConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, vocab_size=64))
    small_lg = LlamaGenConfig(tokenizer=VQ16Config(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, vocab_size=64))
    torch.manual_seed(0)
    tok = build_family(family, var=small_var, llamagen=small_lg).tokenizer
    before = tok.quantize.embedding.weight.detach().clone()
    recipe = TeacherRecipe(vq_epochs=2, vq_batch_size=8, dead_code_restart=True)
    info = train_tokenizer(tok, batch[0][:8], recipe, log=lambda s: None)
    # 8 images x 16 cells cannot use all 64 codes: some were dead after epoch 1 and re-seeded
    assert info["codes_restarted"] > 0
    assert tok.quantize.embedding.weight.shape == before.shape
