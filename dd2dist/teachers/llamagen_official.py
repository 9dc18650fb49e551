"""Released LlamaGen checkpoints (``c2i_{B,L}_256.pt``, ``t2i_XL_stage1_256.pt`` + ``vq_ds16_*.pt``) <-> our
:class:`~dd2dist.teachers.llamagen.LlamaGenTeacher`.

The official layouts (docs/teachers.md §3.5, §3.2) are written out as key -> shape tables built from the architecture
alone, so a file is checked against the published format rather than against our own modules. The key maps are
explicit tables (official name -> our name). Ignorable entries: ``freqs_cis`` / ``causal_mask`` and any
``*.kv_cache.*`` in model files (derived or run-time state), ``quantize.codebook_used`` in tokenizer files (a
training statistic). Everything else must match exactly, by name and shape.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig, VQ16Config
from dd2dist.teachers.layout import conv, norm, require_layout, resnet
from dd2dist.teachers.llamagen import LlamaGenTeacher, ffn_hidden_dim

MODEL_IGNORED = re.compile(r"^(freqs_cis|causal_mask)$|(^|\.)kv_cache\.")
VQ_IGNORED = ("quantize.codebook_used",)
CODEBOOK_USED_LEN = 65536  # fixed size of the released usage counter
LLAMAGEN_KINDS = tuple(k for k in OFFICIAL_ARCHS if k.startswith("llamagen_"))

_LAYER_KEYS = (  # official per-layer names, in file order
    "attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
    "feed_forward.w2.weight", "attention_norm.weight", "ffn_norm.weight",
)


# ---------------------------------------------------------------------------------------------------------
# official layouts
# ---------------------------------------------------------------------------------------------------------


def official_gpt_layout(cfg: LlamaGenConfig) -> OrderedDict[str, tuple[int, ...]]:
    """Official GPT key -> shape in file order: 4 + 7·n_layer keys (c2i), 6 + 7·n_layer (t2i)."""
    D, F, V = cfg.dim, ffn_hidden_dim(cfg), cfg.tokenizer.vocab_size
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    out["tok_embeddings.weight"] = (V, D)
    if cfg.caption_dim > 0:
        out["cls_embedding.uncond_embedding"] = (cfg.cls_token_num, cfg.caption_dim)
        out["cls_embedding.cap_proj.fc1.weight"] = (D, cfg.caption_dim)
        out["cls_embedding.cap_proj.fc2.weight"] = (D, D)
    else:
        out["cls_embedding.embedding_table.weight"] = (cfg.num_classes + 1, D)
    shapes = {
        "attention.wqkv.weight": (3 * D, D), "attention.wo.weight": (D, D), "feed_forward.w1.weight": (F, D),
        "feed_forward.w3.weight": (F, D), "feed_forward.w2.weight": (D, F), "attention_norm.weight": (D,),
        "ffn_norm.weight": (D,),
    }
    for i in range(cfg.n_layer):
        for key in _LAYER_KEYS:
            out[f"layers.{i}.{key}"] = shapes[key]
    out["norm.weight"] = (D,)
    out["output.weight"] = (V, D)
    return out


def _attn(out: OrderedDict, name: str, c: int) -> None:
    norm(out, f"{name}.norm", c)
    for part in ("q", "k", "v", "proj_out"):
        conv(out, f"{name}.{part}", c, c, 1)


def official_vq16_layout(cfg: VQ16Config) -> OrderedDict[str, tuple[int, ...]]:
    """Official VQ-16 key -> shape (without the ignorable ``quantize.codebook_used``): 343 keys at true size."""
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    mults, levels = tuple(cfg.ch_mult), len(cfg.ch_mult)
    conv(out, "encoder.conv_in", cfg.ch, cfg.in_channels, 3)
    c = cfg.ch
    for level, mult in enumerate(mults):
        for i in range(cfg.num_res_blocks):
            resnet(out, f"encoder.conv_blocks.{level}.res.{i}", c, cfg.ch * mult)
            c = cfg.ch * mult
        if level == levels - 1:
            for i in range(cfg.num_res_blocks):
                _attn(out, f"encoder.conv_blocks.{level}.attn.{i}", c)
        else:
            conv(out, f"encoder.conv_blocks.{level}.downsample.conv", c, c, 3)
    resnet(out, "encoder.mid.0", c, c)
    _attn(out, "encoder.mid.1", c)
    resnet(out, "encoder.mid.2", c, c)
    norm(out, "encoder.norm_out", c)
    conv(out, "encoder.conv_out", cfg.z_channels, c, 3)
    c = cfg.ch * mults[-1]
    conv(out, "decoder.conv_in", c, cfg.z_channels, 3)
    resnet(out, "decoder.mid.0", c, c)
    _attn(out, "decoder.mid.1", c)
    resnet(out, "decoder.mid.2", c, c)
    for j, mult in enumerate(mults[::-1]):  # j = 0 is the lowest resolution
        for i in range(cfg.num_res_blocks + 1):
            resnet(out, f"decoder.conv_blocks.{j}.res.{i}", c, cfg.ch * mult)
            c = cfg.ch * mult
        if j == 0:
            for i in range(cfg.num_res_blocks + 1):
                _attn(out, f"decoder.conv_blocks.{j}.attn.{i}", c)
        if j != levels - 1:
            conv(out, f"decoder.conv_blocks.{j}.upsample.conv", c, c, 3)
    norm(out, "decoder.norm_out", c)
    conv(out, "decoder.conv_out", cfg.in_channels, c, 3)
    out["quantize.embedding.weight"] = (cfg.vocab_size, cfg.embed_dim)
    conv(out, "quant_conv", cfg.embed_dim, cfg.z_channels, 1)
    conv(out, "post_quant_conv", cfg.z_channels, cfg.embed_dim, 1)
    return out


def gpt_key_map(cfg: LlamaGenConfig) -> dict[str, str]:
    """Official GPT key -> our teacher key."""
    return {k: f"gpt.{k}" for k in official_gpt_layout(cfg)}


def vq16_key_map(cfg: VQ16Config) -> dict[str, str]:
    """Official VQ-16 key -> our teacher key."""
    return {k: f"tokenizer.{k}" for k in official_vq16_layout(cfg)}


# ---------------------------------------------------------------------------------------------------------
# checking and loading
# ---------------------------------------------------------------------------------------------------------


def unwrap_state_dict(obj, source: str) -> dict[str, Tensor]:
    """The weights of a loaded file: ``obj["model"]`` for the DDP / tokenizer files, else ``obj`` itself."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    return obj


def check_layout(
    state: dict[str, Tensor], layout: OrderedDict[str, tuple[int, ...]], ignored, source: str
) -> dict[str, Tensor]:
    """Drop ignorable keys, then require exactly ``layout``'s keys and shapes; the error names every offender."""
    is_ignored = ignored.search if hasattr(ignored, "search") else (lambda k: k in ignored)
    kept = {k: v for k, v in state.items() if not is_ignored(k)}
    require_layout(kept, layout, source, "official LlamaGen")
    return kept


def _load_file(path: str | Path, map_location) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    return unwrap_state_dict(torch.load(p, map_location=map_location, weights_only=True), str(p))


def teacher_from_official_state(
    cfg: LlamaGenConfig, model_state: dict[str, Tensor], vq_state: dict[str, Tensor], device="cpu",
    sources: tuple[str, str] = ("model state", "tokenizer state"),
) -> LlamaGenTeacher:
    """A teacher (built on the meta device, then assigned) from official-layout state dicts, checked strictly."""
    if cfg.input_adapter == "mlp":
        raise ValueError("official checkpoints have no input_mlp; load with input_adapter 'snap' or 'soft'")
    model_state = unwrap_state_dict(model_state, sources[0])
    vq_state = unwrap_state_dict(vq_state, sources[1])
    gpt_sd = check_layout(model_state, official_gpt_layout(cfg), MODEL_IGNORED, sources[0])
    vq_sd = check_layout(vq_state, official_vq16_layout(cfg.tokenizer), VQ_IGNORED, sources[1])
    ours = {gpt_key_map(cfg)[k]: v.to(device) for k, v in gpt_sd.items()}
    ours.update({vq16_key_map(cfg.tokenizer)[k]: v.to(device) for k, v in vq_sd.items()})
    with torch.device("meta"):
        teacher = LlamaGenTeacher(cfg)
    teacher.load_state_dict(ours, strict=True, assign=True)
    teacher.init_buffers(torch.device(device))
    left = [n for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"official checkpoints left these tensors unset: {left}")
    return teacher


def load_llamagen_official(
    kind: str, model_path: str | Path, tokenizer_path: str | Path, map_location="cpu"
) -> LlamaGenTeacher:
    """Load a released GPT file and VQ-16 file into our teacher (not frozen; the caller freezes).

    ``kind`` is one of ``llamagen_b``, ``llamagen_l`` (c2i, grid 16 = the ``*_256.pt`` files) or ``llamagen_t2i_xl``.
    Files are read with ``weights_only=True``.
    """
    if kind not in LLAMAGEN_KINDS:
        raise ValueError(f"unknown LlamaGen kind {kind!r}; expected one of {', '.join(LLAMAGEN_KINDS)}")
    cfg = OFFICIAL_ARCHS[kind]
    model_state = _load_file(model_path, map_location)
    vq_state = _load_file(tokenizer_path, map_location)
    return teacher_from_official_state(
        cfg, model_state, vq_state, device=map_location, sources=(str(model_path), str(tokenizer_path))
    )


def export_llamagen_official(teacher: LlamaGenTeacher) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(GPT state, VQ-16 state) in the official layouts and key order (wrap each as ``{"model": ...}`` to save).

    The VQ state carries a zero ``quantize.codebook_used`` so the released code's strict tokenizer load accepts it.
    """
    ours = teacher.state_dict()
    model_sd = OrderedDict((k, ours[v].detach().clone()) for k, v in gpt_key_map(teacher.cfg).items())
    vq_sd = OrderedDict((k, ours[v].detach().clone()) for k, v in vq16_key_map(teacher.cfg.tokenizer).items())
    vq_sd[VQ_IGNORED[0]] = torch.zeros(CODEBOOK_USED_LEN, device=teacher.tokenizer.quant_conv.weight.device)
    return model_sd, vq_sd
