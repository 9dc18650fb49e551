"""Official VAR checkpoint layouts: strict loading, refusals naming the key, buffer checks, round trip."""

from collections import OrderedDict

import pytest
import torch

import dd2dist.teachers.arch as arch
from dd2dist.conditions import Cond
from dd2dist.teachers.arch import OFFICIAL_ARCHS, VARConfig
from dd2dist.teachers.var import VARTeacher
from dd2dist.teachers.var_official import (
    export_var_official,
    load_var_official,
    official_model_layout,
    official_vae_layout,
    var_teacher_from_official,
)

TINY = VARConfig()  # depth 2, width 64, 4 heads, patch_nums (1,2,4), 10 classes, V 64, Cvae 8


def _hand_built_model_sd(seed: int = 0) -> OrderedDict:
    """docs/teachers.md §2.5 written out by hand for the tiny size (C=64, H=4, L=21, V=64, Cvae=8)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    lvl = torch.tensor([0] + [1] * 4 + [2] * 16)
    bias = torch.zeros(21, 21)
    for i in range(21):
        for j in range(21):
            if lvl[j] > lvl[i]:
                bias[i, j] = float("-inf")
    sd = OrderedDict()
    sd["pos_start"] = r(1, 1, 64)
    sd["pos_1LC"] = r(1, 21, 64)
    sd["lvl_1L"] = lvl[None].clone()
    sd["attn_bias_for_masking"] = bias[None, None]
    sd["word_embed.weight"], sd["word_embed.bias"] = r(64, 8), r(64)
    sd["class_emb.weight"] = r(11, 64)
    sd["lvl_embed.weight"] = r(3, 64)
    for i in range(2):
        p = f"blocks.{i}."
        sd[p + "attn.scale_mul_1H11"] = torch.full((1, 4, 1, 1), 1.3) + r(1, 4, 1, 1)
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = r(64), r(64)
        sd[p + "attn.zero_k_bias"] = torch.zeros(64)
        sd[p + "attn.mat_qkv.weight"] = r(192, 64)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(64, 64), r(64)
        sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"] = r(256, 64), r(256)
        sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"] = r(64, 256), r(64)
        sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"] = r(384, 64), r(384)
    sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"] = r(128, 64), r(128)
    sd["head.weight"], sd["head.bias"] = r(64, 64), r(64)
    return sd


@pytest.fixture(scope="module")
def official_pair():
    torch.manual_seed(1)
    return export_var_official(VARTeacher(TINY))


def test_key_counts_at_true_sizes():
    for kind in ("var_d16", "var_d20", "var_d24", "var_d30"):
        cfg = OFFICIAL_ARCHS[kind]
        layout = official_model_layout(cfg)
        assert len(layout) == 8 + 13 * cfg.depth + 4
        params = sum(torch.Size(s).numel() for k, s in layout.items() if k not in ("lvl_1L", "attn_bias_for_masking")
                     and not k.endswith("zero_k_bias"))
        assert params == {"var_d16": 310_283_520, "var_d20": 600_917_136,
                          "var_d24": 1_033_399_360, "var_d30": 2_010_020_356}[kind]
    d16 = official_model_layout(OFFICIAL_ARCHS["var_d16"])
    assert len(d16) == 220
    assert list(d16)[:4] == ["pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking"]
    assert d16["attn_bias_for_masking"] == (1, 1, 680, 680) and d16["class_emb.weight"] == (1001, 1024)
    vae = official_vae_layout(OFFICIAL_ARCHS["var_d16"].tokenizer, 10)
    assert len(vae) == 324
    assert sum(torch.Size(s).numel() for k, s in vae.items() if k != "quantize.ema_vocab_hit_SV") == 108_948_355


def test_true_size_layout_matches_our_modules():
    cfg = OFFICIAL_ARCHS["var_d16"]
    with torch.device("meta"):
        teacher = VARTeacher(cfg)
    sd = {k: torch.empty(s, device="meta") for k, s in official_model_layout(cfg).items()}
    vae = {k: torch.empty(s, device="meta") for k, s in official_vae_layout(cfg.tokenizer, 10).items()}
    ours = teacher.state_dict()
    assert len(ours) == (220 - 2 - 16) + 324  # derived buffers are recomputed, not stored
    for key in ("blocks.15.attn.mat_qkv.weight", "head.weight", "pos_1LC"):
        assert ours[f"transformer.{key}"].shape == sd[key].shape
    assert ours["tokenizer.decoder.up.3.block.0.nin_shortcut.weight"].shape == vae[
        "decoder.up.3.block.0.nin_shortcut.weight"].shape


def test_hand_built_state_dict_loads_strictly_and_round_trips(official_pair):
    model_sd = _hand_built_model_sd()
    _, vae_sd = official_pair
    teacher = var_teacher_from_official(TINY, model_sd, vae_sd)
    assert torch.equal(teacher.transformer.blocks[1].ffn.fc2.weight, model_sd["blocks.1.ffn.fc2.weight"])
    assert torch.equal(teacher.transformer.class_emb.weight, model_sd["class_emb.weight"])
    assert torch.equal(teacher.codebook(), vae_sd["quantize.embedding.weight"])
    back_model, back_vae = export_var_official(teacher)
    assert list(back_model) == list(model_sd) and list(back_vae) == list(vae_sd)
    for k in model_sd:
        assert torch.equal(back_model[k], model_sd[k]), k
        assert back_model[k].dtype == model_sd[k].dtype, k
    for k in vae_sd:
        assert torch.equal(back_vae[k], vae_sd[k]), k
    # the loaded model runs
    ids = teacher.sample(Cond(labels=torch.tensor([4])), generator=torch.Generator().manual_seed(0))
    assert ids.shape == (1, 21)


def test_exported_random_model_round_trips_through_files(official_pair, tmp_path, monkeypatch):
    model_sd, vae_sd = official_pair
    vae_sd = OrderedDict(vae_sd)
    vae_sd["quantize.ema_vocab_hit_SV"] = torch.rand(3, 64)  # a training statistic: carried, never read
    torch.save(model_sd, tmp_path / "var_tiny.pth")
    torch.save(vae_sd, tmp_path / "vae_tiny.pth")
    monkeypatch.setitem(arch.OFFICIAL_ARCHS, "var_tiny_test", TINY)  # register the tiny size as a "release"
    teacher = load_var_official("var_tiny_test", tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth")
    back_model, back_vae = export_var_official(teacher)
    assert all(torch.equal(back_model[k], model_sd[k]) for k in model_sd)
    assert all(torch.equal(back_vae[k], vae_sd[k]) for k in vae_sd)
    x = torch.randint(0, 64, (2, 21))
    cond = Cond(labels=torch.tensor([1, 2]))
    original = VARTeacher(TINY)
    original.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(teacher.log_probs(x, cond), original.log_probs(x, cond))
    # the package entry point goes through the same loader and hands back a frozen teacher
    from dd2dist.teachers import load_official

    frozen = load_official("var_tiny_test", str(tmp_path / "var_tiny.pth"), str(tmp_path / "vae_tiny.pth"))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen.codebook(), vae_sd["quantize.embedding.weight"])


def test_renamed_key_is_named(official_pair):
    model_sd, vae_sd = official_pair
    bad = OrderedDict((("blocks.1.attn.proj_w" if k == "blocks.1.attn.proj.weight" else k), v)
                      for k, v in model_sd.items())
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn\.proj\.weight") as err:
        var_teacher_from_official(TINY, bad, vae_sd)
    assert "unexpected keys: blocks.1.attn.proj_w" in str(err.value)
    bad_vae = OrderedDict(vae_sd)
    bad_vae["quantize.codebook.weight"] = bad_vae.pop("quantize.embedding.weight")
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight"):
        var_teacher_from_official(TINY, model_sd, bad_vae, vae_source="vae.pth")


def test_reshaped_key_is_named(official_pair):
    model_sd, vae_sd = official_pair
    bad = OrderedDict(model_sd)
    bad["head.weight"] = torch.zeros(65, 64)
    with pytest.raises(ValueError, match=r"mis-shaped keys: head\.weight: file \(65, 64\) vs expected \(64, 64\)"):
        var_teacher_from_official(TINY, bad, vae_sd)
    bad_vae = OrderedDict(vae_sd)
    bad_vae["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight"):
        var_teacher_from_official(TINY, model_sd, bad_vae)


def test_wrong_buffers_are_refused(official_pair):
    model_sd, vae_sd = official_pair
    # patch_nums (4, 2, 1) also has 21 tokens: same shapes, different scale layout
    other = VARConfig(patch_nums=(4, 2, 1))
    other_sd, _ = export_var_official(VARTeacher(other))
    bad = OrderedDict(model_sd)
    bad["attn_bias_for_masking"] = other_sd["attn_bias_for_masking"]
    with pytest.raises(ValueError, match="attn_bias_for_masking") as err:
        var_teacher_from_official(TINY, bad, vae_sd)
    assert "lvl_1L" not in str(err.value)
    bad["lvl_1L"] = other_sd["lvl_1L"]
    with pytest.raises(ValueError, match="lvl_1L, attn_bias_for_masking"):
        var_teacher_from_official(TINY, bad, vae_sd)
    bad = OrderedDict(model_sd)
    bad["blocks.0.attn.zero_k_bias"] = torch.ones(64)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.zero_k_bias"):
        var_teacher_from_official(TINY, bad, vae_sd)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown official VAR kind 'llamagen_l'"):
        load_var_official("llamagen_l", tmp_path / "a", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="model checkpoint not found"):
        load_var_official("var_d16", tmp_path / "missing.pth", tmp_path / "b")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "wrapped.pth")
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="raw state_dict"):
        load_var_official("var_d16", tmp_path / "wrapped.pth", tmp_path / "empty.pth")
