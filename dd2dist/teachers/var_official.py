"""Released VAR checkpoints (``var_d{16,20,24,30}.pth`` + ``vae_ch160v4096z32.pth``) <-> our :class:`VARTeacher`.

The official layouts (docs/teachers.md §2.5, §2.2) are written out here as key -> shape tables built from the
architecture alone, so a file is checked against the published format rather than against our own modules.
The key maps are explicit tables (official name -> our name). The three derived buffers of the model file
(``lvl_1L``, ``attn_bias_for_masking``, ``blocks.*.attn.zero_k_bias``) are compared with our recomputed values
and dropped; :func:`export_var_official` writes them back, so official -> ours -> official is the identity.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from dd2dist.teachers.arch import OFFICIAL_ARCHS, VARConfig, VARVQConfig
from dd2dist.teachers.layout import conv, norm, require_layout, resnet
from dd2dist.teachers.var import VARTeacher, scale_index_per_token

MODEL_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
ZERO_K_BIAS = "attn.zero_k_bias"

_BLOCK_KEYS = (  # official per-block names, in file order
    "attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", ZERO_K_BIAS, "attn.mat_qkv.weight",
    "attn.proj.weight", "attn.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
    "ada_lin.1.weight", "ada_lin.1.bias",
)


# ---------------------------------------------------------------------------------------------------------
# official layouts
# ---------------------------------------------------------------------------------------------------------


def official_model_layout(cfg: VARConfig) -> OrderedDict[str, tuple[int, ...]]:
    """Official ``var_d*.pth`` key -> shape, in file order (8 + 13·depth + 4 keys with L2-normed attention)."""
    C, H, L = cfg.width, cfg.num_heads, sum(p * p for p in cfg.patch_nums)
    hidden = round(C * cfg.mlp_ratio)
    first_l = cfg.patch_nums[0] ** 2
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    out["pos_start"] = (1, first_l, C)
    out["pos_1LC"] = (1, L, C)
    out["lvl_1L"] = (1, L)
    out["attn_bias_for_masking"] = (1, 1, L, L)
    out["word_embed.weight"] = (C, cfg.tokenizer.embed_dim)
    out["word_embed.bias"] = (C,)
    out["class_emb.weight"] = (cfg.num_classes + 1, C)
    out["lvl_embed.weight"] = (len(cfg.patch_nums), C)
    block_shapes = {
        "attn.scale_mul_1H11": (1, H, 1, 1), "attn.q_bias": (C,), "attn.v_bias": (C,), ZERO_K_BIAS: (C,),
        "attn.mat_qkv.weight": (3 * C, C), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
        "ffn.fc1.weight": (hidden, C), "ffn.fc1.bias": (hidden,), "ffn.fc2.weight": (C, hidden),
        "ffn.fc2.bias": (C,), "ada_lin.1.weight": (6 * C, C), "ada_lin.1.bias": (6 * C,),
    }
    for i in range(cfg.depth):
        for key in _BLOCK_KEYS:
            if key == "attn.scale_mul_1H11" and not cfg.attn_l2_norm:
                continue
            out[f"blocks.{i}.{key}"] = block_shapes[key]
    out["head_nm.ada_lin.1.weight"] = (2 * C, C)
    out["head_nm.ada_lin.1.bias"] = (2 * C,)
    out["head.weight"] = (cfg.tokenizer.vocab_size, C)
    out["head.bias"] = (cfg.tokenizer.vocab_size,)
    return out


def _attn(out: OrderedDict, name: str, c: int) -> None:
    norm(out, f"{name}.norm", c)
    conv(out, f"{name}.qkv", 3 * c, c, 1)
    conv(out, f"{name}.proj_out", c, c, 1)


def _mid(out: OrderedDict, name: str, c: int) -> None:
    resnet(out, f"{name}.block_1", c, c)
    _attn(out, f"{name}.attn_1", c)
    resnet(out, f"{name}.block_2", c, c)


def official_vae_layout(cfg: VARVQConfig, num_scales: int) -> OrderedDict[str, tuple[int, ...]]:
    """Official ``vae_ch160v4096z32.pth`` key -> shape (324 keys at the released size)."""
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    mults, levels, ch, z = tuple(cfg.ch_mult), len(cfg.ch_mult), cfg.ch, cfg.embed_dim
    # encoder
    conv(out, "encoder.conv_in", ch, cfg.in_channels, 3)
    c_in = ch
    for lvl in range(levels):
        c_out = ch * mults[lvl]
        for b in range(cfg.num_res_blocks):
            resnet(out, f"encoder.down.{lvl}.block.{b}", c_in, c_out)
            c_in = c_out
        if lvl == levels - 1:
            for b in range(cfg.num_res_blocks):
                _attn(out, f"encoder.down.{lvl}.attn.{b}", c_in)
        else:
            conv(out, f"encoder.down.{lvl}.downsample.conv", c_in, c_in, 3)
    _mid(out, "encoder.mid", c_in)
    norm(out, "encoder.norm_out", c_in)
    conv(out, "encoder.conv_out", z, c_in, 3)
    # decoder
    c_in = ch * mults[-1]
    conv(out, "decoder.conv_in", c_in, z, 3)
    _mid(out, "decoder.mid", c_in)
    for lvl in reversed(range(levels)):
        c_out = ch * mults[lvl]
        for b in range(cfg.num_res_blocks + 1):
            resnet(out, f"decoder.up.{lvl}.block.{b}", c_in, c_out)
            c_in = c_out
        if lvl == levels - 1:
            for b in range(cfg.num_res_blocks + 1):
                _attn(out, f"decoder.up.{lvl}.attn.{b}", c_in)
        if lvl != 0:
            conv(out, f"decoder.up.{lvl}.upsample.conv", c_in, c_in, 3)
    norm(out, "decoder.norm_out", c_in)
    conv(out, "decoder.conv_out", cfg.in_channels, c_in, 3)
    # quantizer and the 3x3 convs around it
    out["quantize.ema_vocab_hit_SV"] = (num_scales, cfg.vocab_size)
    for i in range(cfg.num_phi):
        conv(out, f"quantize.quant_resi.qresi_ls.{i}", z, z, 3)
    out["quantize.embedding.weight"] = (cfg.vocab_size, z)
    conv(out, "quant_conv", z, z, 3)
    conv(out, "post_quant_conv", z, z, 3)
    return out


# ---------------------------------------------------------------------------------------------------------
# key maps (official name -> our VARTeacher state-dict name)
# ---------------------------------------------------------------------------------------------------------

_MODEL_TOP_LEVEL_MAP = {
    "pos_start": "transformer.pos_start",
    "pos_1LC": "transformer.pos_1LC",
    "word_embed.weight": "transformer.word_embed.weight",
    "word_embed.bias": "transformer.word_embed.bias",
    "class_emb.weight": "transformer.class_emb.weight",
    "lvl_embed.weight": "transformer.lvl_embed.weight",
    "head_nm.ada_lin.1.weight": "transformer.head_nm.ada_lin.1.weight",
    "head_nm.ada_lin.1.bias": "transformer.head_nm.ada_lin.1.bias",
    "head.weight": "transformer.head.weight",
    "head.bias": "transformer.head.bias",
}
_BLOCK_MAP = {  # per-block official suffix -> our suffix (names were kept; zero_k_bias is derived, not stored)
    "attn.scale_mul_1H11": "attn.scale_mul_1H11",
    "attn.q_bias": "attn.q_bias",
    "attn.v_bias": "attn.v_bias",
    "attn.mat_qkv.weight": "attn.mat_qkv.weight",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "ffn.fc1.weight": "ffn.fc1.weight",
    "ffn.fc1.bias": "ffn.fc1.bias",
    "ffn.fc2.weight": "ffn.fc2.weight",
    "ffn.fc2.bias": "ffn.fc2.bias",
    "ada_lin.1.weight": "ada_lin.1.weight",
    "ada_lin.1.bias": "ada_lin.1.bias",
}


def model_key_map(cfg: VARConfig) -> dict[str, str]:
    """Official model key -> our key, for every stored (non-derived) tensor."""
    out = dict(_MODEL_TOP_LEVEL_MAP)
    for i in range(cfg.depth):
        for off, ours in _BLOCK_MAP.items():
            if off == "attn.scale_mul_1H11" and not cfg.attn_l2_norm:
                continue
            out[f"blocks.{i}.{off}"] = f"transformer.blocks.{i}.{ours}"
    return out


def vae_key_map(cfg: VARConfig) -> dict[str, str]:
    """Official VQVAE key -> our key: the tokenizer keeps the official tree under ``tokenizer.``."""
    return {k: f"tokenizer.{k}" for k in official_vae_layout(cfg.tokenizer, len(cfg.patch_nums))}


# ---------------------------------------------------------------------------------------------------------
# derived buffers
# ---------------------------------------------------------------------------------------------------------


def official_lvl_1L(patch_nums: tuple[int, ...]) -> Tensor:
    """(1, L) int64 scale index per token, as stored in the official file."""
    return scale_index_per_token(tuple(patch_nums))[None]


def official_attn_bias(patch_nums: tuple[int, ...]) -> Tensor:
    """(1, 1, L, L) fp32 additive block-causal mask (0 allowed, -inf blocked), as stored in the official file."""
    lvl = scale_index_per_token(tuple(patch_nums))
    allowed = lvl[:, None] >= lvl[None, :]
    return torch.where(allowed, 0.0, float("-inf"))[None, None]


def _check_derived(model_sd: dict[str, Tensor], cfg: VARConfig, source: str) -> None:
    """Raise if a stored derived buffer differs from our recomputed one (a free check of patch_nums)."""
    bad = []
    if not torch.equal(model_sd["lvl_1L"].cpu().long(), official_lvl_1L(cfg.patch_nums)):
        bad.append("lvl_1L")
    if not torch.equal(model_sd["attn_bias_for_masking"].cpu().float(), official_attn_bias(cfg.patch_nums)):
        bad.append("attn_bias_for_masking")
    for i in range(cfg.depth):
        key = f"blocks.{i}.{ZERO_K_BIAS}"
        if bool(model_sd[key].ne(0).any()):
            bad.append(key)
    if bad:
        raise ValueError(
            f"{source}: stored buffers differ from the values recomputed for patch_nums {tuple(cfg.patch_nums)}: "
            f"{', '.join(bad)}"
        )


# ---------------------------------------------------------------------------------------------------------
# validation, load, export
# ---------------------------------------------------------------------------------------------------------


def check_layout(sd: dict[str, Tensor], layout: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key of ``sd`` against ``layout``."""
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{source}: expected a raw state_dict (name -> tensor), got {type(sd).__name__}")
    require_layout(sd, layout, source, "official VAR")


def var_teacher_from_official(
    cfg: VARConfig,
    model_sd: dict[str, Tensor],
    vae_sd: dict[str, Tensor],
    model_source: str = "model state_dict",
    vae_source: str = "tokenizer state_dict",
) -> VARTeacher:
    """Build a :class:`VARTeacher` holding the given official-layout tensors (strict; derived buffers verified).

    The teacher is built on the meta device and the tensors are assigned, so a d30 model costs no random init
    and no second copy; it lives on the device (and dtype) of the given tensors.
    """
    check_layout(model_sd, official_model_layout(cfg), model_source)
    check_layout(vae_sd, official_vae_layout(cfg.tokenizer, len(cfg.patch_nums)), vae_source)
    _check_derived(model_sd, cfg, model_source)
    ours = {our: model_sd[off] for off, our in model_key_map(cfg).items()}
    ours.update({our: vae_sd[off] for off, our in vae_key_map(cfg).items()})
    with torch.device("meta"):
        teacher = VARTeacher(cfg)
    teacher.load_state_dict(ours, strict=True, assign=True)
    teacher.init_buffers(model_sd["pos_1LC"].device)
    return teacher


def _load_file(path: str | Path, map_location, what: str) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAR {what} checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_var_official(kind: str, model_path: str | Path, tokenizer_path: str | Path, map_location="cpu") -> VARTeacher:
    """Load a released VAR model + VQVAE pair (raw state_dicts, ``weights_only=True``) into a :class:`VARTeacher`.

    ``kind`` is var_d16 / var_d20 / var_d24 / var_d30 (architectures from ``OFFICIAL_ARCHS``).
    """
    cfg = OFFICIAL_ARCHS.get(kind)
    if not isinstance(cfg, VARConfig):
        var_kinds = [k for k, v in OFFICIAL_ARCHS.items() if isinstance(v, VARConfig)]
        raise ValueError(f"unknown official VAR kind {kind!r}; expected one of {', '.join(var_kinds)}")
    model_sd = _load_file(model_path, map_location, "model")
    vae_sd = _load_file(tokenizer_path, map_location, "tokenizer")
    return var_teacher_from_official(cfg, model_sd, vae_sd, str(model_path), str(tokenizer_path))


@torch.no_grad()
def export_var_official(teacher: VARTeacher) -> tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]:
    """Our teacher -> (model_sd, vae_sd) in the official layouts and key order, derived buffers included."""
    cfg = teacher.cfg
    sd = teacher.state_dict()
    device = teacher.transformer.pos_1LC.device
    to_ours = model_key_map(cfg)
    model_sd: OrderedDict[str, Tensor] = OrderedDict()
    for key in official_model_layout(cfg):
        if key == "lvl_1L":
            model_sd[key] = official_lvl_1L(cfg.patch_nums).to(device)
        elif key == "attn_bias_for_masking":
            model_sd[key] = official_attn_bias(cfg.patch_nums).to(device)
        elif key.endswith(ZERO_K_BIAS):
            model_sd[key] = torch.zeros(cfg.width, dtype=teacher.transformer.pos_1LC.dtype, device=device)
        else:
            model_sd[key] = sd[to_ours[key]].detach().clone()
    vae_sd = OrderedDict((off, sd[ours].detach().clone()) for off, ours in vae_key_map(cfg).items())
    return model_sd, vae_sd
