"""The MAR-style AdaLN MLP head shared by the stage-1 model, the guidance network and the generator.

docs/method.md §5.2: Linear(Ce -> w) on the noisy token x_t; a sinusoidal t-embedding through an MLP, added to
Linear(f_i) of the backbone feature, is the conditioning vector c; ``depth`` AdaLN residual blocks modulated by c;
an AdaLN final layer and a zero-initialised Linear(w -> Ce). The output is a velocity (dx/dt, pointing toward
noise), so a fresh head predicts v = 0 (x0 = x_t).

:meth:`MLPHead.at_time` freezes the head at one time (the generator's t = 1) into a :class:`FixedTimeHead` for
sampling: the same function with its constants folded and every AdaLN projection in one matrix multiply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
        # one SiLU(c) for every AdaLN layer instead of one each (depth + 1 full-size SiLUs; sampling speed)
        c_act = F.silu(c)
        h = self.input_proj(x_t.to(dtype))
        for block in self.blocks:
            h = block(h, c_act)
        return self.final(h, c_act)

    @torch.no_grad()
    def at_time(self, t: float) -> FixedTimeHead:
        """A frozen snapshot of this head at time ``t`` for sampling (see :class:`FixedTimeHead`); it does not
        follow later weight updates: take a new one after training or loading."""
        return FixedTimeHead(self, t)


class FixedTimeHead(nn.Module):
    """``MLPHead`` at one fixed time, folded for sampling: v(x_t, f) = head(x_t, t, f) to fp32 rounding.

    The one-step generator always runs its head at t = 1, and at the digits size the head's 57 small ops cost
    ~20% of a teacher-forced pass at batch 1, 27 once folded (the speed target is one-step <= 1.1x that pass,
    docs/method.md §12.4). Folded:
    * the time MLP's output is a constant, added to ``cond_proj``'s bias;
    * every AdaLN layer projects the same SiLU(c): their Linears are stacked into one (w -> (3 depth + 2) w) matrix
      multiply, with the ``1 +`` of each scale moved into its bias;
    * each Linear runs as one ``addmm`` on (rows, features) matrices.
    The parameters are copies (buffers): training the source head does not change a snapshot.
    """

    def __init__(self, head: MLPHead, t: float):
        super().__init__()
        width = head.input_proj.out_features
        dtype = head.input_proj.weight.dtype
        t_const = head.time_mlp(timestep_embedding(torch.tensor([float(t)], device=head.input_proj.weight.device),
                                                   head.time_embed_dim).to(dtype))[0]
        weights, biases = [], []
        for layer in [*head.blocks, head.final]:
            bias = layer.ada[1].bias.clone()
            bias[width : 2 * width] += 1  # (shift, scale, [gate]): the scale chunk carries the "1 +"
            weights.append(layer.ada[1].weight)
            biases.append(bias)
        # transposed once here so every product below is a plain (rows, in) @ (in, out)
        tensors = {"cond_w": head.cond_proj.weight.T, "cond_b": head.cond_proj.bias + t_const,
                   "ada_w": torch.cat(weights).T, "ada_b": torch.cat(biases),
                   "in_w": head.input_proj.weight.T, "in_b": head.input_proj.bias,
                   "out_w": head.final.linear.weight.T, "out_b": head.final.linear.bias}
        for i, block in enumerate(head.blocks):
            tensors.update({f"mlp{i}_w1": block.mlp[0].weight.T, f"mlp{i}_b1": block.mlp[0].bias,
                            f"mlp{i}_w2": block.mlp[2].weight.T, f"mlp{i}_b2": block.mlp[2].bias})
        self._load(width, len(head.blocks), head.token_dim, head.cond_dim, t, tensors)

    @classmethod
    def from_tensors(cls, width: int, depth: int, token_dim: int, cond_dim: int, t: float,
                     tensors: dict[str, Tensor]) -> FixedTimeHead:
        """A folded head from its tensors, laid out as :meth:`__init__` lays out an ``MLPHead``'s (``*_w`` as
        (in, out), the ``1 +`` of each scale in ``ada_b``); an ``ada_down_w`` (w, r) makes the modulation rank r
        (``ada_w`` then (r, (3 depth + 2) w)). :class:`dd2dist.nets.compact_head.CompactHead` folds this way."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head._load(width, depth, token_dim, cond_dim, t, tensors)
        return head

    def _load(self, width: int, depth: int, token_dim: int, cond_dim: int, t: float,
              tensors: dict[str, Tensor]) -> None:
        self.width, self.depth, self.token_dim, self.cond_dim, self.time = width, depth, token_dim, cond_dim, float(t)
        self.low_rank = "ada_down_w" in tensors
        for name, value in tensors.items():
            self._buffer(name, value)

    def _buffer(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value.detach().contiguous().clone(), persistent=False)

    def forward(self, x_t: Tensor, feats: Tensor) -> Tensor:
        """Velocity (..., Ce) at tokens x_t (..., Ce) given backbone features (..., D), at ``self.time``."""
        return fixed_time_velocity(x_t, feats, self._buffers, self.width, self.depth, self.token_dim, self.cond_dim)


def fixed_time_velocity(x_t: Tensor, feats: Tensor, p: Mapping[str, Tensor], width: int, depth: int, token_dim: int,
                        cond_dim: int, owner: str = "FixedTimeHead") -> Tensor:
    """The folded AdaLN head's velocity from its tensors ``p`` (the layout of :meth:`FixedTimeHead.from_tensors`).

    :class:`FixedTimeHead` runs it on its buffers; :class:`dd2dist.nets.compact_head.CompactHead` on views of its
    parameters, so the head it trains and the folded head it samples with are one formula. ``owner`` names the head
    in the shape error."""
    if x_t.shape[-1] != token_dim or feats.shape[-1] != cond_dim or x_t.shape[:-1] != feats.shape[:-1]:
        raise ValueError(
            f"{owner} expects x_t (..., {token_dim}) and feats (..., {cond_dim}) with equal leading dims, got "
            f"{tuple(x_t.shape)} and {tuple(feats.shape)}"
        )
    w, lead, dtype = width, x_t.shape[:-1], p["in_w"].dtype
    x = x_t.reshape(-1, token_dim).to(dtype)
    c_act = F.silu(torch.addmm(p["cond_b"], feats.reshape(-1, cond_dim).to(dtype), p["cond_w"]))
    if "ada_down_w" in p:
        c_act = torch.mm(c_act, p["ada_down_w"])
    mods = torch.addmm(p["ada_b"], c_act, p["ada_w"])  # (rows, (3 depth + 2) w)
    h = torch.addmm(p["in_b"], x, p["in_w"])
    for i in range(depth):
        shift, scale, gate = (mods[:, (3 * i + j) * w : (3 * i + j + 1) * w] for j in range(3))
        a = torch.addcmul(shift, F.layer_norm(h, (w,), eps=LN_EPS), scale)
        a = F.silu(torch.addmm(p[f"mlp{i}_b1"], a, p[f"mlp{i}_w1"]))
        h = torch.addcmul(h, gate, torch.addmm(p[f"mlp{i}_b2"], a, p[f"mlp{i}_w2"]))
    o = 3 * depth * w
    a = torch.addcmul(mods[:, o : o + w], F.layer_norm(h, (w,), eps=LN_EPS), mods[:, o + w : o + 2 * w])
    return torch.addmm(p["out_b"], a, p["out_w"]).reshape(*lead, token_dim)
