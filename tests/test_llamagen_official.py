"""Official LlamaGen checkpoint layouts: strict loading through the key tables, errors, wrapper, round trip."""

from dataclasses import replace

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.teachers import load_official
from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig
from dd2dist.teachers.llamagen import LlamaGenTeacher
from dd2dist.teachers.llamagen_official import (
    export_llamagen_official,
    load_llamagen_official,
    official_gpt_layout,
    official_vq16_layout,
    teacher_from_official_state,
)

TINY = LlamaGenConfig()
TINY_T2I = LlamaGenConfig(num_classes=0, cls_token_num=5, caption_dim=16)


def synthetic(layout, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in layout.items()}


@pytest.mark.parametrize("kind", ["llamagen_b", "llamagen_l", "llamagen_t2i_xl"])
def test_official_key_counts(kind):
    cfg = OFFICIAL_ARCHS[kind]
    extra = 2 if cfg.caption_dim else 0  # table -> fc1, fc2, uncond_embedding
    assert len(official_gpt_layout(cfg)) == 4 + 7 * cfg.n_layer + extra
    assert len(official_vq16_layout(cfg.tokenizer)) == 343


def test_layout_by_hand_for_one_layer_loads_strictly_and_lands_in_the_right_places():
    cfg = replace(TINY, n_layer=1)
    D, F, V = 64, 256, 64  # F = round_up(int(8*64/3)=170, 256)
    by_hand = {
        "cls_embedding.embedding_table.weight": (11, D), "tok_embeddings.weight": (V, D),
        "layers.0.attention.wqkv.weight": (3 * D, D), "layers.0.attention.wo.weight": (D, D),
        "layers.0.feed_forward.w1.weight": (F, D), "layers.0.feed_forward.w3.weight": (F, D),
        "layers.0.feed_forward.w2.weight": (D, F), "layers.0.attention_norm.weight": (D,),
        "layers.0.ffn_norm.weight": (D,), "norm.weight": (D,), "output.weight": (V, D),
    }
    assert dict(official_gpt_layout(cfg)) == by_hand
    model = synthetic(by_hand, 1)
    vq = synthetic(official_vq16_layout(cfg.tokenizer), 2)
    t = teacher_from_official_state(cfg, model, vq)
    assert torch.equal(t.gpt.layers[0].feed_forward.w3.weight, model["layers.0.feed_forward.w3.weight"])
    assert torch.equal(t.gpt.cls_embedding.embedding_table.weight, model["cls_embedding.embedding_table.weight"])
    assert torch.equal(t.tokenizer.quantize.embedding.weight, vq["quantize.embedding.weight"])
    assert not any(p.is_meta for p in t.parameters())
    logits = t.log_probs(torch.zeros(1, 16, dtype=torch.long), Cond(labels=torch.tensor([3])))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("cfg", [TINY, TINY_T2I], ids=["c2i", "t2i"])
def test_export_load_round_trip_is_identity(cfg):
    torch.manual_seed(0)
    teacher = LlamaGenTeacher(cfg)
    model_sd, vq_sd = export_llamagen_official(teacher)
    assert list(model_sd) == list(official_gpt_layout(cfg))
    assert vq_sd["quantize.codebook_used"].shape == (65536,)
    back = teacher_from_official_state(cfg, model_sd, vq_sd)
    for k, v in teacher.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    model2, vq2 = export_llamagen_official(back)
    assert all(torch.equal(model2[k], model_sd[k]) for k in model_sd)
    assert all(torch.equal(vq2[k], vq_sd[k]) for k in vq_sd)


def test_files_with_wrapper_freqs_cis_and_kv_cache_load_via_the_registry(tmp_path, monkeypatch):
    cfg = TINY
    torch.manual_seed(0)
    teacher = LlamaGenTeacher(cfg)
    model_sd, vq_sd = export_llamagen_official(teacher)
    wrapped = dict(model_sd)
    wrapped["freqs_cis"] = torch.zeros(17, 8, 2)
    wrapped["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 16)
    model_path, vq_path = tmp_path / "c2i.pt", tmp_path / "vq.pt"
    torch.save({"model": wrapped}, model_path)
    torch.save({"model": vq_sd}, vq_path)
    monkeypatch.setitem(OFFICIAL_ARCHS, "llamagen_b", cfg)  # a tiny stand-in: true-size files are too big here
    loaded = load_official("llamagen_b", str(model_path), str(vq_path))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, 64, (2, 16))
    cond = Cond(labels=torch.tensor([1, 2]))
    torch.testing.assert_close(loaded.log_probs(ids, cond), teacher.log_probs(ids, cond), atol=0, rtol=0)
    # a raw (unwrapped) state dict is accepted as well
    torch.save(model_sd, model_path)
    assert load_llamagen_official("llamagen_b", model_path, vq_path) is not None


def test_renamed_reshaped_missing_and_extra_keys_are_named():
    model_sd, vq_sd = export_llamagen_official(LlamaGenTeacher(TINY))
    renamed = dict(model_sd)
    renamed["layers.1.attention.wqkv_renamed.weight"] = renamed.pop("layers.1.attention.wqkv.weight")
    with pytest.raises(ValueError) as err:
        teacher_from_official_state(TINY, renamed, vq_sd)
    assert "layers.1.attention.wqkv.weight" in str(err.value)
    assert "layers.1.attention.wqkv_renamed.weight" in str(err.value)
    reshaped = dict(model_sd)
    reshaped["norm.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match=r"mis-shaped keys: norm\.weight: file \(65,\) vs expected \(64,\)"):
        teacher_from_official_state(TINY, reshaped, vq_sd)
    bad_vq = dict(vq_sd)
    del bad_vq["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing keys: decoder\.conv_out\.bias$"):
        teacher_from_official_state(TINY, model_sd, bad_vq)
    with pytest.raises(ValueError, match="unknown LlamaGen kind"):
        load_llamagen_official("llamagen_xxl", "a.pt", "b.pt")
    with pytest.raises(FileNotFoundError):
        load_llamagen_official("llamagen_l", "/nonexistent/c2i_L_256.pt", "/nonexistent/vq.pt")
