"""VAR's multi-scale residual VQVAE tokenizer (docs/teachers.md §2.2, §2.3), our own implementation.

The module tree mirrors the released ``vae_ch160v4096z32.pth`` so its keys map one to one:
``encoder`` / ``decoder`` (conv_in, down|up.{l}.block/attn/downsample|upsample, mid.block_1/attn_1/block_2,
norm_out, conv_out), ``quant_conv`` / ``post_quant_conv`` (3x3) and ``quantize`` (raw codebook ``embedding`` and
the four shared residual convs ``quant_resi.qresi_ls.{i}``).

Token layout: an image is S per-scale maps of ``patch_nums[k]**2`` ids; flat sequences concatenate the scales
in order, row-major inside a scale. The DD2 latent of a token is its raw code vector ``embedding.weight[id]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.teachers.arch import VARVQConfig


def phi_index_per_scale(num_scales: int, num_phi: int = 4) -> list[int]:
    """Which shared φ conv each scale uses: argmin |ticks - k/(S-1)| with ticks = linspace(1/(3K), 1-1/(3K), K).

    Computed with numpy float64 exactly as the released model does, because a floating-point tie decides the
    mapping (for S=10, K=4 it is [0,0,1,1,1,2,2,3,3,3]).
    """
    if num_scales < 2:
        raise ValueError(f"patch_nums must have at least 2 scales, got {num_scales}")
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


def _group_norm(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"VQVAE channel count {channels} is not a multiple of 32 (GroupNorm(32) needs it)")
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a (1x1 ``nin_shortcut`` when channels change) skip."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention: GN -> one 1x1 ``qkv`` conv -> softmax(q^T k / sqrt(c)) -> ``proj_out``."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Asymmetric pad (0,1,0,1) then a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B,3,H,W) -> latent (B, Cvae, H/2^(levels-1), W/2^(levels-1)); attention only at the last level."""

    def __init__(self, cfg: VARVQConfig):
        super().__init__()
        mults = tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in = cfg.ch
        for level, mult in enumerate(mults):
            stage = nn.Module()
            ch_out = cfg.ch * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, ch_out))
                ch_in = ch_out
                if level == len(mults) - 1:
                    attns.append(AttnBlock(ch_in))
            stage.block, stage.attn = blocks, attns
            if level != len(mults) - 1:
                stage.downsample = Downsample(ch_in)
            self.down.append(stage)
        self.mid = _Mid(ch_in)
        self.norm_out = _group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, Cvae, h, w) -> image; ``up.{l}`` is indexed by level (run from the deepest level down to 0)."""

    def __init__(self, cfg: VARVQConfig):
        super().__init__()
        mults = tuple(cfg.ch_mult)
        ch_in = cfg.ch * mults[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, ch_in, 3, padding=1)
        self.mid = _Mid(ch_in)
        stages: list[nn.Module] = []
        for level in reversed(range(len(mults))):
            stage = nn.Module()
            ch_out = cfg.ch * mults[level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch_in, ch_out))
                ch_in = ch_out
                if level == len(mults) - 1:
                    attns.append(AttnBlock(ch_in))
            stage.block, stage.attn = blocks, attns
            if level != 0:
                stage.upsample = Upsample(ch_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """φ(h) = (1 - r) h + r conv3x3(h), r = ``phi_ratio`` (0.5): the residual refinement of each scale's codes."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: Tensor) -> Tensor:
        # fp32 whatever the module dtype: f_hat accumulates over all scales and must not drift in bf16.
        h = h.float()
        conv = F.conv2d(h, self.weight.float(), self.bias.float(), padding=1)
        return h * (1 - self.ratio) + conv * self.ratio


class PhiShared(nn.Module):
    """The K shared φ convs (``qresi_ls.{i}``)."""

    def __init__(self, dim: int, count: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(count))


class MultiScaleQuantizer(nn.Module):
    """Raw codebook + shared φ convs + the residual multi-scale quantisation / accumulation rules.

    ``ema_vocab_hit_SV`` is a training statistic of the released file: kept as a buffer so an official file
    round-trips exactly, never read.
    """

    def __init__(self, cfg: VARVQConfig, patch_nums: tuple[int, ...]):
        super().__init__()
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.vocab_size, self.embed_dim = cfg.vocab_size, cfg.embed_dim
        self.phi_index = phi_index_per_scale(len(self.patch_nums), cfg.num_phi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.quant_resi = PhiShared(cfg.embed_dim, cfg.num_phi, cfg.phi_ratio)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)

    @property
    def side(self) -> int:
        """Side of the full-resolution latent map (the last scale)."""
        return self.patch_nums[-1]

    def codebook(self) -> Tensor:
        """(V, Cvae) fp32 raw code vectors, read through the ``embedding`` module (ZeRO-3 gathers it there)."""
        ids = torch.arange(self.vocab_size, device=self.ema_vocab_hit_SV.device)
        return self.embedding(ids).float()

    def phi(self, scale: int, h: Tensor) -> Tensor:
        return self.quant_resi.qresi_ls[self.phi_index[scale]](h)

    def scale_contribution(self, scale: int, h_BChw: Tensor) -> Tensor:
        """φ_k(bicubic-up(h_k)) at full resolution (the last scale is not resized), fp32."""
        h = h_BChw.float()
        if scale != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(self.side, self.side), mode="bicubic", align_corners=False)
        return self.phi(scale, h)

    def nearest_ids(self, f_BChw: Tensor) -> Tensor:
        """Plain-L2 nearest raw code per cell: (B, Cvae, h, w) -> ids (B, h, w)."""
        B, C, h, w = f_BChw.shape
        flat = f_BChw.permute(0, 2, 3, 1).reshape(-1, C).float()
        code = self.codebook()
        dist = flat.square().sum(1, keepdim=True) + code.square().sum(1) - 2 * flat @ code.T
        return dist.argmin(1).view(B, h, w)

    def f_to_ids(self, f_BChw: Tensor) -> tuple[list[Tensor], Tensor]:
        """Residual quantisation of an encoder map -> (per-scale id maps (B, pn, pn), the accumulated f_hat)."""
        f_rest = f_BChw.float().clone()
        f_hat = torch.zeros_like(f_rest)
        ids_per_scale = []
        last = len(self.patch_nums) - 1
        for k, pn in enumerate(self.patch_nums):
            rest = f_rest if k == last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            ids = self.nearest_ids(rest)
            h = self.embedding(ids).permute(0, 3, 1, 2)
            contrib = self.scale_contribution(k, h)
            f_hat = f_hat + contrib
            f_rest = f_rest - contrib
            ids_per_scale.append(ids)
        return ids_per_scale, f_hat


class VARVQVAE(nn.Module):
    """VAR's multi-scale residual VQVAE. Images are in [-1, 1]; image side = last patch_num * 2^(levels-1)."""

    def __init__(self, cfg: VARVQConfig, patch_nums: tuple[int, ...]):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.scale_lens = [p * p for p in self.patch_nums]
        self.num_tokens = sum(self.scale_lens)
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg, self.patch_nums)
        self.quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, padding=1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    # ---- layout helpers -------------------------------------------------------------------------------
    def split_scales(self, x: Tensor) -> list[Tensor]:
        """Flat (B, N, ...) -> per-scale (B, pn**2, ...) chunks."""
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens (patch_nums {self.patch_nums}), got {x.shape[1]}")
        return list(torch.split(x, self.scale_lens, dim=1))

    def _to_map(self, v_BlC: Tensor, pn: int) -> Tensor:
        return v_BlC.transpose(1, 2).reshape(v_BlC.shape[0], v_BlC.shape[2], pn, pn)

    # ---- tokens <-> f_hat -----------------------------------------------------------------------------
    def vectors_to_fhat(self, per_scale: list[Tensor]) -> Tensor:
        """Per-scale vectors (B, pn**2, Cvae), code vectors or continuous -> f_hat (B, Cvae, side, side), fp32."""
        if len(per_scale) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} scales, got {len(per_scale)}")
        f_hat = None
        for k, (v, pn) in enumerate(zip(per_scale, self.patch_nums)):
            contrib = self.quantize.scale_contribution(k, self._to_map(v, pn))
            f_hat = contrib if f_hat is None else f_hat + contrib
        return f_hat

    def teacher_forced_inputs(self, x: Tensor) -> Tensor:
        """Flat vectors (B, N, Cvae) -> the transformer inputs of scales 1..S-1, (B, N - first_l, Cvae), fp32.

        Input of scale k+1 = area-down(Σ_{j<=k} φ_j(bicubic-up(h_j)), pn_{k+1}): VAR's next-scale input built from
        vectors instead of ids, differentiable in x. The last scale's vectors are not used.
        """
        per_scale = self.split_scales(x)
        B = x.shape[0]
        f_hat = None
        inputs = []
        for k in range(len(self.patch_nums) - 1):
            contrib = self.quantize.scale_contribution(k, self._to_map(per_scale[k], self.patch_nums[k]))
            f_hat = contrib if f_hat is None else f_hat + contrib
            pn_next = self.patch_nums[k + 1]
            nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            inputs.append(nxt.reshape(B, self.cfg.embed_dim, -1).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def next_scale_input(self, scale: int, f_hat: Tensor | None, h_BlC: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sampler step: add scale vectors to f_hat -> (new f_hat, next scale input (B, pn², C) or None)."""
        contrib = self.quantize.scale_contribution(scale, self._to_map(h_BlC, self.patch_nums[scale]))
        f_hat = contrib if f_hat is None else f_hat + contrib
        if scale == len(self.patch_nums) - 1:
            return f_hat, None
        pn_next = self.patch_nums[scale + 1]
        nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
        return f_hat, nxt.reshape(f_hat.shape[0], self.cfg.embed_dim, -1).transpose(1, 2)

    # ---- images ---------------------------------------------------------------------------------------
    def img_to_ids(self, img: Tensor) -> list[Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> per-scale id maps [(B, pn, pn)]."""
        if img.shape[-1] != self.image_size or img.shape[-2] != self.image_size:
            raise ValueError(f"image must be {self.image_size}x{self.image_size}, got {tuple(img.shape[-2:])}")
        f = self.quant_conv(self.encoder(img.to(self.quant_conv.weight.dtype)))
        ids, _ = self.quantize.f_to_ids(f)
        return ids

    def img_to_flat_ids(self, img: Tensor) -> Tensor:
        """Images -> flat ids (B, N), scales concatenated, row-major inside a scale."""
        return torch.cat([m.flatten(1) for m in self.img_to_ids(img)], dim=1)

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """f_hat (B, Cvae, side, side) -> fp32 images in [-1, 1] (the decoder runs in the module's dtype)."""
        w = self.post_quant_conv.weight
        return self.decoder(self.post_quant_conv(f_hat.to(w.dtype))).float().clamp(-1, 1)

    def decode_vectors(self, x: Tensor) -> Tensor:
        """Flat vectors (B, N, Cvae) -> images (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.vectors_to_fhat(self.split_scales(x)))

    def decode_ids(self, ids: Tensor) -> Tensor:
        """Flat ids (B, N) -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_vectors(self.quantize.embedding(ids))
