"""LlamaGen's VQ-16 image tokenizer (docs/teachers.md §3.2), our own implementation.

The module tree mirrors the released ``vq_ds16_c2i.pt`` / ``vq_ds16_t2i.pt`` so their keys map one to one:
``encoder.conv_blocks.{l}.res/attn/downsample`` (attention at the last, lowest-resolution level, with separate
``q`` / ``k`` / ``v`` 1x1 convs), ``encoder.mid.{0,1,2}``; ``decoder.conv_blocks.{j}`` with ``j = 0`` the LOWEST
resolution (attention there, ``upsample`` on every level but the last); 1x1 ``quant_conv`` / ``post_quant_conv``;
``quantize.embedding`` (raw codebook, normalised on use). The released ``quantize.codebook_used`` usage counter is a
training statistic and is not part of this module (the loader drops it).

Token layout: an image of side ``grid * 2^(levels-1)`` is ``grid**2`` ids in raster order (index = y*W + x). The
DD2 latent of a token is its L2-normalised code vector.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.teachers.arch import VQ16Config
from dd2dist.teachers.var_vqvae import Downsample, ResnetBlock, Upsample


def _group_norm(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"VQ-16 channel count {channels} is not a multiple of 32 (GroupNorm(32) needs it)")
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention: separate 1x1 ``q``, ``k``, ``v`` convs, ``proj_out``, a residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


def _mid(ch: int) -> nn.ModuleList:
    """``mid.{0: res, 1: attn, 2: res}``."""
    return nn.ModuleList([ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)])


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class VQ16Encoder(nn.Module):
    """Image (B, 3, H, W) -> (B, z_channels, H/2^(L-1), W/2^(L-1)); attention only at the last level."""

    def __init__(self, cfg: VQ16Config):
        super().__init__()
        mults = tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        ch_in = cfg.ch
        for level, mult in enumerate(mults):
            stage = nn.Module()
            ch_out = cfg.ch * mult
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(ch_in, ch_out))
                ch_in = ch_out
                if level == len(mults) - 1:
                    attn.append(AttnBlock(ch_in))
            stage.res, stage.attn = res, attn
            if level != len(mults) - 1:
                stage.downsample = Downsample(ch_in)
            self.conv_blocks.append(stage)
        self.mid = _mid(ch_in)
        self.norm_out = _group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            h = _run_level(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQ16Decoder(nn.Module):
    """(B, z_channels, h, w) -> image; ``conv_blocks.0`` is the lowest resolution and runs first."""

    def __init__(self, cfg: VQ16Config):
        super().__init__()
        mults = tuple(cfg.ch_mult)[::-1]
        ch_in = cfg.ch * mults[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _mid(ch_in)
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(mults):
            stage = nn.Module()
            ch_out = cfg.ch * mult
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(ch_in, ch_out))
                ch_in = ch_out
                if level == 0:
                    attn.append(AttnBlock(ch_in))
            stage.res, stage.attn = res, attn
            if level != len(mults) - 1:
                stage.upsample = Upsample(ch_in)
            self.conv_blocks.append(stage)
        self.norm_out = _group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for stage in self.conv_blocks:
            h = _run_level(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQ16Quantizer(nn.Module):
    """The codebook (stored raw, as released) and the cosine nearest-code rule."""

    def __init__(self, cfg: VQ16Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        # the released init, uniform(-1/V, 1/V); real codebooks come from a checkpoint
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.vocab_size, 1.0 / cfg.vocab_size)

    def normalized_codebook(self) -> Tensor:
        """(V, Ce) fp32 unit code vectors: the DD2 latent space of LlamaGen."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def nearest_ids(self, z: Tensor) -> Tensor:
        """(..., Ce) -> ids (...): the nearest normalised code to the normalised z, i.e. the largest dot product."""
        flat = z.reshape(-1, z.shape[-1]).float()
        return (flat @ self.normalized_codebook().T).argmax(-1).reshape(z.shape[:-1])


class VQ16(nn.Module):
    """LlamaGen's VQ-16 tokenizer. Images are in [-1, 1]; decoded images are NOT clamped (as released)."""

    def __init__(self, cfg: VQ16Config):
        super().__init__()
        self.cfg = cfg
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder = VQ16Encoder(cfg)
        self.decoder = VQ16Decoder(cfg)
        self.quantize = VQ16Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def codebook(self) -> Tensor:
        """(V, Ce) fp32 L2-normalised code vectors."""
        return self.quantize.normalized_codebook()

    def embed(self, ids: Tensor) -> Tensor:
        """ids (B, N) -> unit code vectors (B, N, Ce) fp32."""
        return self.codebook()[ids]

    def encode_ids(self, img: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> ids (B, N) in raster order (N = (H/16)*(W/16) at true size)."""
        if img.dim() != 4 or img.shape[-1] % self.downsample or img.shape[-2] % self.downsample:
            raise ValueError(
                f"image must be (B, {self.cfg.in_channels}, H, W) with H, W multiples of {self.downsample}, "
                f"got {tuple(img.shape)}"
            )
        z = self.quant_conv(self.encoder(img.to(self.quant_conv.weight.dtype)))  # (B, Ce, h, w)
        return self.quantize.nearest_ids(z.permute(0, 2, 3, 1)).flatten(1)

    def decode_vectors(self, x: Tensor, side: int | None = None) -> Tensor:
        """Vectors (B, N, Ce) (unit codes or any continuous 8-d vectors) in raster order -> images (B, 3, H, W).

        ``side`` is the token grid side; by default sqrt(N), which must be an integer.
        """
        if x.dim() != 3 or x.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"vectors must be (B, N, {self.cfg.embed_dim}), got {tuple(x.shape)}")
        B, N, Ce = x.shape
        if side is None:
            side = int(round(N**0.5))
        if side * side != N:
            raise ValueError(f"cannot lay {N} tokens out on a square grid of side {side}")
        w = self.post_quant_conv.weight
        q = x.to(w.dtype).transpose(1, 2).reshape(B, Ce, side, side)
        return self.decoder(self.post_quant_conv(q))

    def decode_ids(self, ids: Tensor, side: int | None = None) -> Tensor:
        """ids (B, N) in raster order -> images (B, 3, H, W)."""
        return self.decode_vectors(self.embed(ids), side)
