"""LlamaGen teacher on tiny configs: teacher forcing vs the KV-cached sampler, causality, RoPE, adapters, text masks."""

import math
from dataclasses import replace

import pytest
import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig
from dd2dist.teachers.llamagen import (
    LlamaGenTeacher,
    RMSNorm,
    apply_rope,
    rope_2d_cache,
    soft_input_weights,
    text_attention_mask,
)

C2I = LlamaGenConfig()  # 2 layers, D 64, 4 heads, grid 4, V 64, Ce 8, 10 classes
T2I = LlamaGenConfig(num_classes=0, cls_token_num=5, caption_dim=16)


def make(cfg: LlamaGenConfig, seed: int = 0) -> LlamaGenTeacher:
    torch.manual_seed(seed)
    return LlamaGenTeacher(cfg).freeze()


def text_cond(batch: int, cfg: LlamaGenConfig, valid: list[int], seed: int = 1) -> Cond:
    """Left-padded text: the last ``valid[b]`` slots of row b hold features, the padded ones are zero."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.cls_token_num
    mask = torch.zeros(batch, T, dtype=torch.bool)
    for b, n in enumerate(valid):
        mask[b, T - n :] = True
    text = torch.randn(batch, T, cfg.caption_dim, generator=g) * mask[..., None]
    return Cond(text=text, text_mask=mask)


def assert_same_log_probs(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), "the filtered (-inf) sets differ"
    torch.testing.assert_close(a[fa], b[fb], atol=atol, rtol=0)


# ---- teacher forcing == incremental sampling --------------------------------------------------------------

SAMPLINGS = [
    Sampling(guidance_scale=1.0),
    Sampling(guidance_scale=2.0, top_k=20),
    Sampling(guidance_scale=3.0, top_p=0.9, temperature=0.7),
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["no-cfg", "cfg2-topk", "cfg3-topp-temp"])
def test_class_sampler_log_probs_match_teacher_forcing(sampling):
    t = make(C2I)
    cond = Cond(labels=torch.tensor([0, 3, 9]))
    ids, lp_inc = t.sample(cond, sampling, torch.Generator().manual_seed(0), return_log_probs=True)
    assert ids.shape == (3, 16) and int(ids.min()) >= 0 and int(ids.max()) < t.vocab_size
    assert_same_log_probs(lp_inc, t.log_probs(ids, cond, sampling))
    # the drawn tokens are inside the kept set
    assert torch.isfinite(lp_inc.gather(-1, ids[..., None])).all()


@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=["no-cfg", "cfg2-topk"])
def test_text_sampler_log_probs_match_teacher_forcing(sampling):
    t = make(T2I)
    cond = text_cond(3, T2I, valid=[5, 2, 0])
    ids, lp_inc = t.sample(cond, sampling, torch.Generator().manual_seed(0), return_log_probs=True)
    assert_same_log_probs(lp_inc, t.log_probs(ids, cond, sampling))


def test_cfg_combines_cond_and_null_rows_as_uncond_plus_w_times_difference():
    t = make(C2I)
    cond = Cond(labels=torch.tensor([2, 5]))
    ids = torch.randint(0, t.vocab_size, (2, t.num_tokens), generator=torch.Generator().manual_seed(3))
    raw_c = t.head_logits(t.features(ids, cond))
    raw_u = t.head_logits(t.features(ids, t.null_cond(2)))
    expect = torch.log_softmax(raw_u + 2.5 * (raw_c - raw_u), -1)
    torch.testing.assert_close(t.log_probs(ids, cond, Sampling(guidance_scale=2.5)), expect, atol=1e-5, rtol=0)


def test_mlp_adapter_sampler_matches_teacher_forcing_and_ids_equal_code_vectors():
    t = make(replace(C2I, input_adapter="mlp"))
    cond = Cond(labels=torch.tensor([1, 4]))
    s = Sampling(guidance_scale=2.0)
    ids, lp_inc = t.sample(cond, s, torch.Generator().manual_seed(1), return_log_probs=True)
    assert_same_log_probs(lp_inc, t.log_probs(ids, cond, s))
    torch.testing.assert_close(t.features(ids, cond), t.features(t.embed(ids), cond), atol=0, rtol=0)


# ---- causality, RoPE, conditioning ----------------------------------------------------------------------


def test_perturbing_token_j_changes_only_later_rows():
    t = make(C2I)
    cond = Cond(labels=torch.tensor([1, 2]))
    ids = torch.randint(0, t.vocab_size, (2, t.num_tokens), generator=torch.Generator().manual_seed(0))
    base = t.features(ids, cond)
    for j in (0, 5, 14):
        other = ids.clone()
        other[:, j] = (other[:, j] + 1) % t.vocab_size
        f = t.features(other, cond)
        torch.testing.assert_close(f[:, : j + 1], base[:, : j + 1], atol=1e-6, rtol=0)
        assert (f[:, j + 1] - base[:, j + 1]).abs().max() > 1e-4
    # the last token never enters the teacher-forced pass
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 1) % t.vocab_size
    torch.testing.assert_close(t.features(other, cond), base, atol=0, rtol=0)


def test_rope_condition_rows_are_zero_and_image_rows_follow_the_2d_rule():
    hd, grid, base, T = 16, 4, 10000.0, 3
    table = rope_2d_cache(grid, hd, base, T)
    assert table.shape == (T + grid * grid, hd // 2, 2)
    assert torch.count_nonzero(table[:T]) == 0
    half = hd // 2
    for y in range(grid):
        for x in range(grid):
            row = table[T + y * grid + x]
            for j in range(half):
                axis_pos = y if j < half // 2 else x
                k = j % (half // 2)
                ang = axis_pos * base ** (-(2 * k) / half)
                assert abs(row[j, 0].item() - math.cos(ang)) < 1e-6
                assert abs(row[j, 1].item() - math.sin(ang)) < 1e-6
    for cfg in (C2I, T2I):
        t = make(cfg)
        assert torch.count_nonzero(t.gpt.rope[: cfg.cls_token_num]) == 0
        assert t.gpt.rope.shape[0] == cfg.cls_token_num + cfg.grid**2


@pytest.mark.parametrize("compiling", [False, True], ids=["complex-form", "real-form"])
def test_apply_rope_and_rmsnorm_match_their_formulas(compiling, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    rope = torch.randn(5, 4, 2, generator=g)
    out = apply_rope(x, rope)
    torch.testing.assert_close(apply_rope(x[:, :, None], rope)[:, :, 0], out)  # extra middle dims broadcast
    for j in range(4):
        x0, x1 = x[..., 2 * j], x[..., 2 * j + 1]
        c, s = rope[None, :, None, j, 0], rope[None, :, None, j, 1]
        torch.testing.assert_close(out[..., 2 * j], x0 * c - x1 * s)
        torch.testing.assert_close(out[..., 2 * j + 1], x1 * c + x0 * s)
    assert apply_rope(x.bfloat16(), rope).dtype == torch.bfloat16
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    expect = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expect)


def test_labels_never_dropped_and_passes_deterministic_in_train_mode():
    t = make(C2I)
    t.train()  # even in train mode there is no label / token dropout
    ids = torch.randint(0, t.vocab_size, (4, t.num_tokens), generator=torch.Generator().manual_seed(0))
    cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
    a, b = t.features(ids, cond), t.features(ids, cond)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    null = t.features(ids, t.null_cond(4))
    assert ((a - null).abs().amax(dim=(1, 2)) > 1e-4).all()
    assert t.null_cond(4).labels.tolist() == [C2I.num_classes] * 4


def test_sampler_reproducible_with_fixed_generator():
    t = make(C2I)
    cond = Cond(labels=torch.tensor([3, 3, 7]))
    a = t.sample(cond, generator=torch.Generator().manual_seed(42))
    b = t.sample(cond, generator=torch.Generator().manual_seed(42))
    c = t.sample(cond, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bf16_sampler_runs_and_draws_from_a_distribution_close_to_fp32():
    t = make(C2I)
    cond = Cond(labels=torch.tensor([1, 2]))
    s = Sampling(guidance_scale=2.0)
    ids, lp = t.sample(cond, s, torch.Generator().manual_seed(0), return_log_probs=True, dtype=torch.bfloat16)
    assert ids.shape == (2, 16) and lp.dtype == torch.float32
    assert t.gpt.output.weight.dtype == torch.float32  # the teacher itself was not cast
    ref = t.log_probs(ids, cond, s)
    assert (lp.exp() - ref.exp()).abs().max() < 0.05


def test_cast_copy_is_cached_and_rebuilt_when_weights_change():
    t = make(C2I)
    cond = Cond(labels=torch.tensor([1]))
    t.sample(cond, dtype=torch.bfloat16)
    first = t._inference_gpt(torch.bfloat16, False)[0]
    assert first is not t.gpt and first.output.weight.dtype == torch.bfloat16
    assert t._inference_gpt(torch.bfloat16, False)[0] is first
    assert not any(k.startswith("_sampler") for k in t.state_dict())
    with torch.no_grad():
        t.gpt.output.weight.mul_(2.0)
    rebuilt = t._inference_gpt(torch.bfloat16, False)[0]
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt.output.weight, t.gpt.output.weight.bfloat16())
    assert t._inference_gpt(None, False)[0] is t.gpt


def test_bad_inputs_raise_clear_errors():
    t = make(C2I)
    with pytest.raises(ValueError, match="cond.labels"):
        t.features(torch.zeros(1, 16, dtype=torch.long), Cond(labels=torch.tensor([11])))
    with pytest.raises(ValueError, match="x must be ids"):
        t.features(torch.zeros(1, 15, dtype=torch.long), Cond(labels=torch.tensor([1])))
    with pytest.raises(ValueError, match="input_adapter"):
        LlamaGenTeacher(replace(C2I, input_adapter="linear"))
    with pytest.raises(ValueError, match="text"):
        make(T2I).features(torch.zeros(1, 16, dtype=torch.long), Cond(labels=torch.tensor([1])))


# ---- continuous-input adapters -------------------------------------------------------------------------


def test_snap_on_code_vectors_equals_ids_path_exactly():
    t = make(C2I)
    cond = Cond(labels=torch.tensor([1, 8]))
    ids = torch.randint(0, t.vocab_size, (2, t.num_tokens), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(t.features(t.embed(ids), cond), t.features(ids, cond), atol=0, rtol=0)
    # off-codebook vectors snap to their largest-dot-product code (scale does not matter)
    noisy = 3.0 * t.embed(ids) + 0.05 * torch.randn(2, t.num_tokens, t.embed_dim)
    snapped = (noisy @ t.codebook().T).argmax(-1)
    torch.testing.assert_close(t.features(noisy, cond), t.features(snapped, cond), atol=0, rtol=0)


def test_soft_adapter_tends_to_snap_as_tau_goes_to_zero():
    snap = make(C2I)
    cond = Cond(labels=torch.tensor([1, 8]))
    x = torch.randn(2, snap.num_tokens, snap.embed_dim, generator=torch.Generator().manual_seed(0))
    ref = snap.features(x, cond)
    errs = []
    for tau in (1.0, 1e-2, 1e-5):
        soft = LlamaGenTeacher(replace(C2I, input_adapter="soft", soft_tau=tau))
        soft.load_state_dict(snap.state_dict())
        errs.append((soft.features(x, cond) - ref).abs().max().item())
    assert errs[0] > 1e-2
    assert errs[2] < 1e-5
    assert errs[0] > errs[1] > errs[2]


def test_soft_adapter_flushes_subnormal_weights_and_nothing_else():
    """At a sharp τ far codes' softmax weights underflow into fp32 subnormals (slow on x86): the rule zeroes those
    and keeps every other weight of the plain softmax."""
    soft = LlamaGenTeacher(replace(C2I, input_adapter="soft", soft_tau=0.01))
    x = torch.randn(4, soft.num_tokens, soft.embed_dim, generator=torch.Generator().manual_seed(0))
    codebook = soft.codebook()
    plain = torch.softmax((x @ codebook.T) / 0.01, dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    subnormal = (plain > 0) & (plain < tiny)
    assert subnormal.any()  # the case guarded against does occur at this τ
    weights = soft_input_weights(x, codebook, 0.01)
    assert not ((weights > 0) & (weights < tiny)).any() and (weights[subnormal] == 0).all()
    assert torch.equal(weights[~subnormal], plain[~subnormal])
    torch.testing.assert_close(soft.gpt.embed_inputs(x, codebook), weights @ soft.gpt.tok_embeddings.weight,
                               atol=0, rtol=0)
    # the threshold it keeps weights above is the largest subnormal: the smallest normal float itself is kept
    from dd2dist.teachers.llamagen import LARGEST_SUBNORMAL_F32

    edge = torch.tensor(LARGEST_SUBNORMAL_F32)
    assert 0 < LARGEST_SUBNORMAL_F32 < tiny and torch.nextafter(edge, torch.tensor(1.0)).item() == tiny


# ---- text-to-image ------------------------------------------------------------------------------------


def test_text_mask_rule_matches_a_direct_construction():
    T, L = 4, 7
    text_mask = torch.tensor([[False, False, True, True], [True, True, True, True], [False] * 4])
    m = text_attention_mask(text_mask, L)
    assert m.shape == (3, 1, L, L)
    for b in range(3):
        for q in range(L):
            for k in range(L):
                key_ok = bool(text_mask[b, k]) if k < T else True
                assert bool(m[b, 0, q, k]) == ((k <= q and key_ok) or q == k)


def test_padded_text_slots_change_nothing_and_null_cond_keeps_the_mask():
    t = make(T2I)
    cond = text_cond(2, T2I, valid=[3, 1])
    ids = torch.randint(0, t.vocab_size, (2, t.num_tokens), generator=torch.Generator().manual_seed(0))
    base = t.features(ids, cond)
    garbage = cond.text + 5.0 * torch.randn_like(cond.text) * (~cond.text_mask)[..., None]
    torch.testing.assert_close(t.features(ids, Cond(text=garbage, text_mask=cond.text_mask)), base, atol=1e-6, rtol=0)
    # a valid slot does matter
    changed = cond.text.clone()
    changed[:, -1] += 1.0
    assert (t.features(ids, Cond(text=changed, text_mask=cond.text_mask)) - base).abs().max() > 1e-4
    null = t.null_cond(2, like=cond)
    assert torch.equal(null.text_mask, cond.text_mask)
    torch.testing.assert_close(null.text[0], t.gpt.cls_embedding.uncond_embedding)
    # CFG log-probs use the null caption with the same mask
    s = Sampling(guidance_scale=4.0)
    raw_c = t.head_logits(t.features(ids, cond))
    raw_u = t.head_logits(t.features(ids, null))
    torch.testing.assert_close(
        t.log_probs(ids, cond, s), torch.log_softmax(raw_u + 4.0 * (raw_c - raw_u), -1), atol=1e-5, rtol=0
    )


def test_empty_caption_stays_finite():
    t = make(T2I)
    cond = text_cond(1, T2I, valid=[0])
    ids = torch.zeros(1, t.num_tokens, dtype=torch.long)
    assert torch.isfinite(t.log_probs(ids, cond, Sampling(guidance_scale=3.0))).all()


# ---- true sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,count", [("llamagen_b", 110_888_448), ("llamagen_l", 342_910_976), ("llamagen_t2i_xl", 777_678_080)]
)
def test_parameter_counts_at_true_size(kind, count):
    with torch.device("meta"):
        t = LlamaGenTeacher(OFFICIAL_ARCHS[kind])
    assert sum(p.numel() for p in t.gpt.parameters()) == count
    assert sum(p.numel() for p in t.tokenizer.parameters()) == 71_883_403
    assert t.num_tokens == 256 and t.vocab_size == 16384 and t.embed_dim == 8
