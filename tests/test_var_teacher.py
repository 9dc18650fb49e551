"""VAR teacher: teacher-forced log-probs vs the KV-cached sampler, causality, labels, reproducibility, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from dd2dist.conditions import Cond, Sampling
from dd2dist.teachers.arch import OFFICIAL_ARCHS, VARConfig
from dd2dist.teachers.var import VARTeacher, VARTransformer

CFG_ON = Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_k=20, top_p=0.9)
CFG_OFF = Sampling(guidance_scale=0.0, guidance_schedule="var_linear")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    t = VARTeacher(VARConfig())
    with torch.no_grad():  # a spread codebook and a sharper head make CFG/top-k/top-p matter
        t.tokenizer.quantize.embedding.weight.normal_()
        t.transformer.head.weight.mul_(4.0)
    return t.freeze()


@pytest.fixture()
def cond():
    return Cond(labels=torch.tensor([0, 3, 7]))


def _assert_same_log_probs(sampled, forced):
    finite = torch.isfinite(sampled)
    assert torch.equal(finite, torch.isfinite(forced)), "filtered code sets differ"
    torch.testing.assert_close(sampled[finite], forced[finite], rtol=0, atol=5e-5)


@pytest.mark.parametrize("sampling", [CFG_OFF, CFG_ON], ids=["no_cfg", "cfg_var_linear_topk_topp"])
def test_teacher_forced_log_probs_equal_kv_cached_sampler(teacher, cond, sampling):
    g = torch.Generator().manual_seed(5)
    ids, sampled = teacher.sample(cond, sampling, g, return_log_probs=True)
    assert ids.shape == (3, 21) and sampled.shape == (3, 21, 64)
    forced = teacher.log_probs(ids, cond, sampling)
    _assert_same_log_probs(sampled, forced)
    # the drawn ids are inside the kept set
    assert torch.isfinite(forced.gather(-1, ids[..., None])).all()
    if sampling is CFG_ON:
        assert (~torch.isfinite(forced)).any(), "filtering should remove some codes"


def test_cfg_uses_the_ramped_var_rule(teacher, cond):
    """Guided log-probs = log_softmax((1+g_k) cond - g_k uncond), g_k = cfg k/(S-1), computed here by hand."""
    x = teacher.embed(torch.randint(0, 64, (3, 21)))
    s = Sampling(guidance_scale=1.5, guidance_schedule="var_linear")
    with torch.no_grad():
        got = teacher.log_probs(x, cond, s)
        c = teacher.head_logits(teacher.features(x, cond), cond)
        null = teacher.null_cond(3)
        u = teacher.head_logits(teacher.features(x, null), null)
    g = torch.tensor([0.0] + [0.75] * 4 + [1.5] * 16)[None, :, None]
    torch.testing.assert_close(got, torch.log_softmax((1 + g) * c - g * u, -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, 5:], torch.log_softmax(c, -1)[:, 5:], atol=1e-3)


def test_raw_log_probs_are_the_conditional_softmax(teacher, cond):
    x = torch.randint(0, 64, (3, 21))
    with torch.no_grad():
        raw = teacher.log_probs(x, cond)
        logits = teacher.head_logits(teacher.features(x, cond), cond)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(raw, torch.log_softmax(logits, -1))


@pytest.mark.parametrize("scale", [0, 1])
def test_block_causal_structure(teacher, cond, scale):
    sl = teacher.steps[scale]
    x = teacher.embed(torch.randint(0, 64, (3, 21)))
    y = x.clone()
    y[:, sl] += torch.randn_like(y[:, sl])
    with torch.no_grad():
        fx, fy = teacher.features(x, cond), teacher.features(y, cond)
    assert torch.equal(fx[:, : sl.stop], fy[:, : sl.stop]), "rows of scales <= k must not see scale k"
    for later in teacher.steps[scale + 1 :]:
        assert (fx[:, later] - fy[:, later]).abs().amax() > 1e-4, f"rows {later} must depend on scale {scale}"


def test_sos_row_depends_only_on_the_label(teacher):
    x = teacher.embed(torch.randint(0, 64, (2, 21)))
    with torch.no_grad():
        a = teacher.features(x, Cond(labels=torch.tensor([1, 1])))
        b = teacher.features(torch.randn_like(x), Cond(labels=torch.tensor([1, 2])))
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.allclose(a[1, 0], b[1, 0])


def test_labels_are_never_dropped(teacher, cond):
    assert not any(isinstance(m, torch.nn.Dropout) for m in teacher.modules())
    x = torch.randint(0, 64, (3, 21))
    with torch.no_grad():
        first = teacher.log_probs(x, cond)
        teacher.train()  # even in train mode nothing is random
        try:
            again = [teacher.log_probs(x, cond) for _ in range(3)]
        finally:
            teacher.eval()
        null = teacher.log_probs(x, teacher.null_cond(3))
    for out in again:
        assert torch.equal(first, out)
    assert not torch.allclose(first, null, atol=1e-3), "labels must change the output"


def test_sampler_is_reproducible_and_seed_dependent(teacher, cond):
    draw = lambda seed: teacher.sample(cond, CFG_ON, torch.Generator().manual_seed(seed))
    a, b, c = draw(11), draw(11), draw(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    default = teacher.sample(cond, None, torch.Generator().manual_seed(0))  # top_k 900 clamped to V=64
    assert default.shape == (3, 21) and int(default.max()) < 64


def test_continuous_inputs_are_native_and_differentiable(teacher, cond):
    ids = torch.randint(0, 64, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(teacher.features(ids, cond), teacher.features(teacher.embed(ids), cond))
    x = teacher.embed(ids).clone().requires_grad_(True)
    teacher.log_probs(x, cond, CFG_ON)[torch.isfinite(teacher.log_probs(x, cond, CFG_ON))].sum().backward()
    assert x.grad[:, :5].abs().sum() > 0
    assert torch.count_nonzero(x.grad[:, 5:]) == 0  # the last scale's vectors condition nothing


def test_decode_and_encode_round_shapes(teacher):
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        img = teacher.decode(ids)
        torch.testing.assert_close(img, teacher.decode(teacher.embed(ids)))
        assert img.shape == (2, 3, 16, 16)
        assert teacher.encode(img).shape == (2, 21)
    assert torch.equal(teacher.quantize(teacher.embed(ids)), ids)


def test_interface_attributes(teacher):
    assert teacher.family == "var" and teacher.num_tokens == 21 and teacher.hidden_dim == 64
    assert teacher.steps == [slice(0, 1), slice(1, 5), slice(5, 21)]
    assert teacher.step_of_token.tolist() == [0] + [1] * 4 + [2] * 16
    assert teacher.codebook().shape == (64, 8) and teacher.codebook().dtype == torch.float32
    expected = Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_k=64, top_p=0.95)
    assert teacher.default_sampling == expected
    with pytest.raises(ValueError, match="labels"):
        teacher.features(torch.zeros(1, 21, dtype=torch.long), Cond(text=torch.zeros(1, 2, 3)))
    with pytest.raises(ValueError, match="21"):
        teacher.features(torch.zeros(1, 20, dtype=torch.long), Cond(labels=torch.zeros(1, dtype=torch.long)))


def test_attention_matches_an_explicit_reference(teacher):
    """One block's attention vs explicit per-head math (L2-normed q,k, clamped per-head temperature, mask)."""
    attn = teacher.transformer.blocks[0].attn
    x = torch.randn(2, 21, 64)
    mask = teacher.transformer.attn_mask
    with torch.no_grad():
        attn.scale_mul_1H11[0, 0] = 10.0  # beyond ln(100): must be clamped
        got = attn(x, mask)
        qkv = x @ attn.mat_qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(64), attn.v_bias])
        q, k, v = qkv.view(2, 21, 3, 4, 16).permute(2, 0, 3, 1, 4)
        temp = torch.tensor([math.log(100.0)] + attn.scale_mul_1H11.flatten()[1:].tolist()).exp()
        scores = (F.normalize(q, dim=-1) * temp[None, :, None, None]) @ F.normalize(k, dim=-1).transpose(-1, -2)
        scores = scores.masked_fill(~mask, float("-inf"))
        want = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 21, 64))
        attn.scale_mul_1H11[0, 0] = math.log(4.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["var_d16", "var_d20", "var_d24", "var_d30"])
def test_true_size_transformer_parameter_counts(kind):
    expected = {"var_d16": 310_283_520, "var_d20": 600_917_136, "var_d24": 1_033_399_360, "var_d30": 2_010_020_356}
    with torch.device("meta"):
        model = VARTransformer(OFFICIAL_ARCHS[kind])
    assert sum(p.numel() for p in model.parameters()) == expected[kind]


def test_adaln_block_and_head_follow_the_released_split_order(teacher):
    """ada_lin chunks are γ1, γ2, scale1, scale2, shift1, shift2 (head: scale, shift); LN without affine, eps 1e-6."""
    tr = teacher.transformer
    blk = tr.blocks[1]
    x, labels = torch.randn(2, 21, 64), torch.tensor([2, 10])
    with torch.no_grad():
        cond = tr.class_emb(labels)
        mod = (F.silu(cond) @ blk.ada_lin[1].weight.T + blk.ada_lin[1].bias)[:, None, :]
        g1, g2, s1, s2, b1, b2 = mod.split(64, dim=-1)
        ln = lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-6)
        h = x + g1 * blk.attn(ln(x) * (1 + s1) + b1, tr.attn_mask)
        ffn_in = ln(h) * (1 + s2) + b2
        gelu = lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
        fc1, fc2 = blk.ffn.fc1, blk.ffn.fc2
        want = h + g2 * (gelu(ffn_in @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias)
        torch.testing.assert_close(blk(x, cond, tr.attn_mask), want, rtol=1e-4, atol=1e-5)
        head_ada = tr.head_nm.ada_lin[1]
        scale, shift = (F.silu(cond) @ head_ada.weight.T + head_ada.bias)[:, None].split(64, -1)
        want_logits = (ln(x) * (1 + scale) + shift) @ tr.head.weight.T + tr.head.bias
        torch.testing.assert_close(tr.logits(x, cond), want_logits, rtol=1e-4, atol=1e-4)


def _partition_like_zero3(model: torch.nn.Module) -> None:
    """Hold every parameter's data only during the forward of the module that owns it (DeepSpeed ZeRO-3's rule:
    a module's own parameters are gathered in its forward hooks and released after)."""
    stash = {}

    def release(mod, *_):
        for name, p in mod.named_parameters(recurse=False):
            stash[(id(mod), name)] = p.data
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def gather(mod, *_):
        for name, p in mod.named_parameters(recurse=False):
            p.data = stash[(id(mod), name)]

    for mod in model.modules():
        if next(mod.parameters(recurse=False), None) is not None:
            mod.register_forward_pre_hook(gather)
            mod.register_forward_hook(release)
            release(mod)


def test_parameters_are_read_only_inside_their_own_modules_forward(cond):
    """So a ZeRO-3-partitioned teacher computes the same log-probs, samples, codebook and images."""
    torch.manual_seed(3)
    t = VARTeacher(VARConfig()).freeze()
    ids = torch.randint(0, 64, (3, 21))
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = (t.log_probs(ids, cond, CFG_ON), t.sample(cond, CFG_ON, torch.Generator().manual_seed(1)),
                t.codebook(), t.decode(ids), t.encode(img))
        _partition_like_zero3(t)
        assert t.transformer.pos_1LC.numel() == 0 and t.tokenizer.quantize.embedding.weight.numel() == 0
        got = (t.log_probs(ids, cond, CFG_ON), t.sample(cond, CFG_ON, torch.Generator().manual_seed(1)),
               t.codebook(), t.decode(ids), t.encode(img))
    for w, g in zip(want, got):
        assert torch.equal(w, g)
