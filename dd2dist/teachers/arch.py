"""Architecture hyper-parameters of the teacher families and their tokenizers (frozen dataclasses).

Defaults are the tiny CPU sizes of docs/teachers.md §5; :data:`OFFICIAL_ARCHS` holds the released models' sizes
(docs/teachers.md §2.1, §2.2, §3.1, §3.2). These dataclasses are also the ``teacher.var`` / ``teacher.llamagen``
sections of the YAML config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VARVQConfig:
    """VAR's multi-scale residual VQVAE (docs/teachers.md §2.2). Channel counts must be multiples of 32."""

    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)  # len-1 downsamplings: (1,2,2) -> 4x
    num_res_blocks: int = 2
    vocab_size: int = 64
    embed_dim: int = 8  # Cvae
    beta: float = 0.25
    num_phi: int = 4  # shared quant_resi convs
    phi_ratio: float = 0.5
    in_channels: int = 3


@dataclass(frozen=True)
class VARConfig:
    """VAR transformer (docs/teachers.md §2.1): width = 64*depth unless ``width`` is set; heads = width/64 unless
    set."""

    depth: int = 2
    width: int = 64
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_nums: tuple[int, ...] = (1, 2, 4)
    num_classes: int = 10
    attn_l2_norm: bool = True
    tokenizer: VARVQConfig = field(default_factory=VARVQConfig)


@dataclass(frozen=True)
class VQ16Config:
    """LlamaGen's VQ-16 tokenizer (docs/teachers.md §3.2)."""

    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    z_channels: int = 32
    vocab_size: int = 64
    embed_dim: int = 8
    in_channels: int = 3


@dataclass(frozen=True)
class LlamaGenConfig:
    """LlamaGen GPT (docs/teachers.md §3.1). ``ffn_dim`` 0 means round_up(int(8*dim/3), multiple_of)."""

    n_layer: int = 2
    n_head: int = 4
    dim: int = 64
    ffn_dim: int = 0
    multiple_of: int = 256
    grid: int = 4  # tokens per side; N = grid**2
    num_classes: int = 10
    cls_token_num: int = 1  # 120 for text-to-image
    caption_dim: int = 0  # 2048 for text-to-image (T5-XL features); 0 = class-conditional
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    input_adapter: str = "snap"  # snap | soft | mlp: how continuous (B,N,Ce) inputs enter (docs/teachers.md §3.3)
    soft_tau: float = 0.1
    adapter_hidden: int = 0  # mlp adapter width; 0 = dim
    tokenizer: VQ16Config = field(default_factory=VQ16Config)


_VAR_VQ_FULL = VARVQConfig(ch=160, ch_mult=(1, 1, 2, 2, 4), vocab_size=4096, embed_dim=32)
_VQ16_FULL = VQ16Config(ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256, vocab_size=16384, embed_dim=8)
_VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _var(d: int) -> VARConfig:
    return VARConfig(depth=d, width=64 * d, num_heads=d, patch_nums=_VAR_PN, num_classes=1000, tokenizer=_VAR_VQ_FULL)


OFFICIAL_ARCHS: dict[str, VARConfig | LlamaGenConfig] = {
    "var_d16": _var(16),
    "var_d20": _var(20),
    "var_d24": _var(24),
    "var_d30": _var(30),
    "llamagen_b": LlamaGenConfig(n_layer=12, n_head=12, dim=768, grid=16, num_classes=1000, tokenizer=_VQ16_FULL),
    "llamagen_l": LlamaGenConfig(n_layer=24, n_head=16, dim=1024, grid=16, num_classes=1000, tokenizer=_VQ16_FULL),
    "llamagen_t2i_xl": LlamaGenConfig(
        n_layer=36, n_head=20, dim=1280, grid=16, num_classes=0, cls_token_num=120, caption_dim=2048,
        tokenizer=_VQ16_FULL,
    ),
}
