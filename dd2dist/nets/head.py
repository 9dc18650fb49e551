"""The MAR-style AdaLN MLP head shared by the stage-1 model, the guidance network and the generator.

method.md §4.3 [PROP]: Linear(Ce -> w) on the noisy token x_t; a sinusoidal t-embedding through an MLP, added to
Linear(f_i) of the backbone feature, is the conditioning vector c; ``depth`` AdaLN residual blocks modulated by c;
an AdaLN final layer and a zero-initialised Linear(w -> Ce). The output is a velocity (dx/dt, pointing toward
noise), so a fresh head predicts v = 0 (x0 = x_t).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-6
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, the DDPM-style range the sinusoid frequencies suit


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of times t (...,) in [0, 1] -> (..., dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_SCALE)[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class AdaLNResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) from c; the modulation starts at zero
    so every block starts as the identity (as in MAR / DiT).

    ``forward`` takes SiLU(c), which every AdaLN layer of the head shares: :class:`MLPHead` computes it once
    (``ada`` keeps its (SiLU, Linear) layout so checkpoints keep their keys; only ``ada[1]`` runs here).
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift, scale, gate = self.ada[1](c_act).chunk(3, dim=-1)
        h = torch.addcmul(shift, F.layer_norm(x, (self.width,), eps=LN_EPS), 1 + scale)
        return torch.addcmul(x, gate, self.mlp(h))


class AdaLNFinalLayer(nn.Module):
    """LN(x) * (1 + scale) + shift -> Linear(w -> out), with the output Linear zero-initialised; takes SiLU(c)
    like :class:`AdaLNResBlock`."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.width = width
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift, scale = self.ada[1](c_act).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, F.layer_norm(x, (self.width,), eps=LN_EPS), 1 + scale))


class MLPHead(nn.Module):
    """Per-token velocity head v(x_t, t, f): (B, N, Ce), (B, N), (B, N, D) -> (B, N, Ce).

    Args:
        token_dim: Ce, the codebook dimension.
        cond_dim: D, the backbone feature width.
        width: w, the MLP width.
        depth: number of AdaLN residual blocks.
        time_embed_dim: size of the sinusoidal t-embedding fed to the time MLP.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, time_embed_dim: int):
        super().__init__()
        if min(token_dim, cond_dim, width, depth, time_embed_dim) <= 0:
            raise ValueError(
                f"MLPHead sizes must be > 0: token_dim={token_dim}, cond_dim={cond_dim}, width={width}, "
                f"depth={depth}, time_embed_dim={time_embed_dim}"
            )
        self.token_dim, self.cond_dim, self.time_embed_dim = token_dim, cond_dim, time_embed_dim
        self.input_proj = nn.Linear(token_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final = AdaLNFinalLayer(width, token_dim)

    def forward(self, x_t: Tensor, t: Tensor | float, feats: Tensor) -> Tensor:
        """Velocity at (x_t, t) given backbone features; t is (B, N) per token or a scalar."""
        if x_t.shape[-1] != self.token_dim or feats.shape[-1] != self.cond_dim or x_t.shape[:-1] != feats.shape[:-1]:
            raise ValueError(
                f"MLPHead expects x_t (..., {self.token_dim}) and feats (..., {self.cond_dim}) with equal leading "
                f"dims, got {tuple(x_t.shape)} and {tuple(feats.shape)}"
            )
        dtype = self.input_proj.weight.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.dim() == 0:
            # one time for every token (the generator's t=1): embed it once and broadcast, instead of running the
            # time MLP on B*N identical rows (a tenth of the head's work at the digits size)
            t = t.reshape(1)
        else:
            t = t.expand(x_t.shape[:-1])
        c = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(dtype)) + self.cond_proj(feats.to(dtype))
        # one SiLU(c) for every AdaLN layer instead of one each (depth + 1 full-size SiLUs; issue #7 speed)
        c_act = F.silu(c)
        h = self.input_proj(x_t.to(dtype))
        for block in self.blocks:
            h = block(h, c_act)
        return self.final(h, c_act)
