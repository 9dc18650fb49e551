"""VAR (next-scale prediction) teacher: our own transformer, teacher-forced pass and KV-cached sampler.

Facts implemented here are docs/teachers.md §2.1 (AdaLN blocks, L2-normalised attention, block-causal mask, class
token used as SOS and as AdaLN condition), §2.4 (sampling) and §2.3 (teacher forcing from continuous vectors).
Parameter names follow the released ``var_d*.pth`` so :mod:`dd2dist.teachers.var_official` maps them 1:1.

Deliberate departures from the released code: labels are never dropped (the released forward drops them even in
eval mode) and there is no drop-path or dropout anywhere (the teacher is frozen).

ZeRO-3 rule: every parameter is read only inside the ``forward`` of the module that owns it (DeepSpeed gathers a
module's own parameters in its forward hooks, nowhere else). So attention calls ``mat_qkv`` as a module, the
transformer's own ``pos_start`` / ``pos_1LC`` are read in ``VARTransformer.forward``, and the codebook is read
through the tokenizer's ``embedding`` module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.conditions import Cond, Sampling, TokenPicker
from dd2dist.latent import guidance_weights, process_logits
from dd2dist.teachers.arch import VARConfig
from dd2dist.teachers.base import ARTeacher
from dd2dist.teachers.var_vqvae import VARVQVAE

MAX_LOG_SCALE_MUL = math.log(100.0)  # clamp of the per-head attention temperature (log space)
LN_EPS = 1e-6


def scale_index_per_token(patch_nums: tuple[int, ...]) -> Tensor:
    """(L,) int64: the scale of every token in the flat layout."""
    return torch.cat([torch.full((pn * pn,), k, dtype=torch.long) for k, pn in enumerate(patch_nums)])


class LayerKVCache:
    """Preallocated K/V of one block for the sampler: (rows, H, L, head_dim), filled scale by scale."""

    def __init__(self, rows: int, num_heads: int, length: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.empty(rows, num_heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.end = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this scale's keys/values and return all keys/values so far."""
        n = k.shape[2]
        self.k[:, :, self.end : self.end + n] = k
        self.v[:, :, self.end : self.end + n] = v
        self.end += n
        return self.k[:, :, : self.end], self.v[:, :, : self.end]


class SelfAttention(nn.Module):
    """Multi-head attention with a bias-free ``mat_qkv`` plus ``q_bias`` / ``v_bias`` (k has none).

    With L2 norm: q and k are unit vectors per head, q is multiplied by exp(min(scale_mul_1H11, ln 100)) and the
    softmax scale is 1. Without: the released fallback scale 0.25 / sqrt(head_dim).
    """

    def __init__(self, width: int, num_heads: int, l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, cache: LayerKVCache | None = None) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = (self.mat_qkv(x) + bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_LOG_SCALE_MUL).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttnBlock(nn.Module):
    """x += γ1·Attn(LN(x)(1+scale1)+shift1); x += γ2·FFN(LN(x)(1+scale2)+shift2), modulation from the class vector.

    ``ada_lin`` = SiLU -> Linear(C, 6C), split in the order γ1, γ2, scale1, scale2, shift1, shift2.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, l2_norm: bool):
        super().__init__()
        self.width = width
        self.attn = SelfAttention(width, num_heads, l2_norm)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self,
        x: Tensor,
        cond_BD: Tensor | None,
        attn_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
        ada: Tensor | None = None,
    ) -> Tensor:
        """``ada`` = a precomputed ``ada_lin(cond_BD)`` (the sampler computes it once for all scales)."""
        ada = self.ada_lin(cond_BD) if ada is None else ada
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.view(-1, 1, 6, self.width).unbind(2)
        h = F.layer_norm(x, (self.width,), eps=LN_EPS)
        x = x + self.attn(h * (1 + scale1) + shift1, attn_mask, cache) * gamma1
        h = F.layer_norm(x, (self.width,), eps=LN_EPS)
        return x + self.ffn(h * (1 + scale2) + shift2) * gamma2


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1+scale)+shift with ``ada_lin`` = SiLU -> Linear(C, 2C) split scale, shift."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, cond_BD: Tensor | None, ada: Tensor | None = None) -> Tensor:
        ada = self.ada_lin(cond_BD) if ada is None else ada
        scale, shift = ada.view(-1, 1, 2, self.width).unbind(2)
        return F.layer_norm(x, (self.width,), eps=LN_EPS) * (1 + scale) + shift


class VARTransformer(nn.Module):
    """The VAR backbone + head. Inputs are the word-embedding inputs of scales 1..S-1 (see ``forward``)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"var.width {cfg.width} is not divisible by var.num_heads {cfg.num_heads}")
        if len(cfg.patch_nums) < 2 or any(p < 1 for p in cfg.patch_nums):
            raise ValueError(f"var.patch_nums must hold >= 2 positive sizes, got {cfg.patch_nums}")
        self.cfg = cfg
        self.patch_nums = tuple(int(p) for p in cfg.patch_nums)
        C = self.width = cfg.width
        self.num_heads = cfg.num_heads
        self.first_l = self.patch_nums[0] ** 2
        self.num_tokens = sum(p * p for p in self.patch_nums)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.num_tokens, C))
        self.word_embed = nn.Linear(cfg.tokenizer.embed_dim, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # index num_classes = the CFG null class
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttnBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.attn_l2_norm) for _ in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, cfg.tokenizer.vocab_size)
        self.init_buffers(self.pos_1LC.device)
        self.reset_parameters()

    def init_buffers(self, device) -> None:
        """(Re)compute the derived, non-persistent buffers: scale index per token and the block-causal mask.

        Called again after loading into a module built on the meta device.
        """
        lvl = scale_index_per_token(self.patch_nums).to(device)
        self.register_buffer("lvl_1L", lvl, persistent=False)
        # a query at scale i sees keys of scales j <= i (True = attend)
        self.register_buffer("attn_mask", lvl[:, None] >= lvl[None, :], persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init (our own): truncated normals of std sqrt(1/(3C)), zero biases, AdaLN gates open (γ=1)."""
        std = math.sqrt(1 / self.width / 3)
        for p in (self.pos_start, self.pos_1LC, self.class_emb.weight, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        C = self.width
        for blk in self.blocks:
            blk.ada_lin[1].bias[: 2 * C] = 1.0  # γ1, γ2 = 1: a plain pre-LN transformer at init

    def class_vector(self, labels: Tensor) -> Tensor:
        """(B,) labels (num_classes = null) -> (B, C): the SOS token and the AdaLN condition."""
        return self.class_emb(labels)

    def forward(self, x_in: Tensor | None, labels: Tensor,
                extra: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced block outputs (B, L, C) from the next-scale inputs x_in (B, L - first_l, Cvae), plus
        ``extra`` (B, L - first_l, C) added to their embeddings where given (a student's continuous input path).

        With ``x_in=None``, the sampler's start instead: (class vectors (B, C), first-scale input (B, first_l, C),
        per-token lvl+pos embeddings (L, C)). Both live here because they read this module's own parameters.
        """
        B = labels.shape[0]
        cond_BD = self.class_vector(labels)
        sos = cond_BD[:, None, :].expand(B, self.first_l, self.width) + self.pos_start
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC[0]
        if x_in is None:
            return cond_BD, sos + lvl_pos[: self.first_l], lvl_pos
        tokens = self.word_embed(x_in.to(self.word_embed.weight.dtype))
        if extra is not None:
            tokens = tokens + extra.to(tokens.dtype)
        h = torch.cat([sos, tokens], dim=1) + lvl_pos
        for blk in self.blocks:
            h = blk(h, cond_BD, self.attn_mask)
        return h

    def logits(self, feats: Tensor, cond_BD: Tensor | None, ada: Tensor | None = None) -> Tensor:
        """head(head_nm(feats)) as fp32 (B, l, V); ``ada`` = a precomputed ``head_nm.ada_lin(cond_BD)``."""
        return self.head(self.head_nm(feats, cond_BD, ada)).float()


class VARTeacher(ARTeacher):
    """VAR class-conditional teacher: transformer + multi-scale VQVAE tokenizer (``self.tokenizer``)."""

    family = "var"
    sample_returns_log_probs = True
    # A student copy with a posterior head sets this: its features are then the class-modulated ``head_nm`` output,
    # the exact input of the (copied) output layer, so that its code logits are one linear layer of the features
    features_after_head_norm = False

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = VARTransformer(cfg)
        self.tokenizer = VARVQVAE(cfg.tokenizer, cfg.patch_nums)
        # A student copy may add a continuous input path (dd2dist.nets.vector_input): a per-token MLP of each scale's
        # raw vectors, upsampled onto the next scale's grid and added to that scale's input embedding. Teachers have
        # none. (An instance attribute: a class attribute would shadow the submodule once one is assigned.)
        self.vector_input: nn.Module | None = None
        self.vocab_size = cfg.tokenizer.vocab_size
        self.embed_dim = cfg.tokenizer.embed_dim
        self.num_tokens = self.transformer.num_tokens
        self.num_classes = cfg.num_classes
        self.hidden_dim = cfg.width
        self.patch_nums = self.transformer.patch_nums
        bounds = [0]
        for pn in self.patch_nums:
            bounds.append(bounds[-1] + pn * pn)
        self.steps = [slice(b, e) for b, e in zip(bounds[:-1], bounds[1:])]
        self.register_buffer("step_of_token", scale_index_per_token(self.patch_nums), persistent=False)
        self.default_sampling = Sampling(
            guidance_scale=2.0, guidance_schedule="var_linear", top_k=min(900, self.vocab_size), top_p=0.95
        )

    def init_buffers(self, device) -> None:
        """Recompute derived buffers on ``device`` (after loading into a meta-device build)."""
        self.transformer.init_buffers(device)
        self.register_buffer("step_of_token", scale_index_per_token(self.patch_nums).to(device), persistent=False)

    # ---- codebook space -------------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        return self.tokenizer.quantize.codebook()

    # ---- conditioning ---------------------------------------------------------------------------------
    def null_cond(self, batch_size: int, like: Cond | None = None) -> Cond:
        device = self.step_of_token.device
        return Cond(labels=torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))

    def _labels(self, cond: Cond) -> Tensor:
        if cond.labels is None:
            raise ValueError("VAR teacher needs cond.labels (class ids; num_classes is the null class)")
        return cond.labels

    def _vectors(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and not x.is_floating_point():
            x = self.embed(x)
        if x.dim() != 3 or x.shape[1] != self.num_tokens or x.shape[2] != self.embed_dim:
            raise ValueError(
                f"x must be ids (B, {self.num_tokens}) or vectors (B, {self.num_tokens}, {self.embed_dim}), "
                f"got {tuple(x.shape)} ({x.dtype})"
            )
        return x

    # ---- teacher-forced passes ------------------------------------------------------------------------
    def features(self, x: Tensor, cond: Cond) -> Tensor:
        vectors = self._vectors(x)
        x_in = self.tokenizer.teacher_forced_inputs(vectors)
        labels = self._labels(cond)
        h = self.transformer(x_in, labels, None if self.vector_input is None else self._parent_inputs(vectors))
        if self.features_after_head_norm:
            return self.transformer.head_nm(h, self.transformer.class_vector(labels))
        return h

    def _parent_inputs(self, vectors: Tensor) -> Tensor:
        """The continuous input path's additions (B, N - first_l, C): ``vector_input`` of every vector of scale k,
        nearest-upsampled onto the grid of scale k + 1 (each token of scale k + 1 gets the MLP features of the
        token of scale k it lies in). VAR's own input path mixes the earlier scales linearly; this gives each token
        a nonlinear view of its parent's raw vector, which for the generator is its noise."""
        B = vectors.shape[0]
        feats = self.vector_input(vectors[:, : self.steps[-1].start])  # every scale but the last, (B, ., C)
        parts = []
        for k in range(len(self.patch_nums) - 1):
            pn, pn_next = self.patch_nums[k], self.patch_nums[k + 1]
            grid = feats[:, self.steps[k]].transpose(1, 2).reshape(B, -1, pn, pn)
            grid = F.interpolate(grid, size=(pn_next, pn_next), mode="nearest")
            parts.append(grid.reshape(B, grid.shape[1], -1).transpose(1, 2))
        return torch.cat(parts, dim=1)

    def head_logits(self, feats: Tensor, cond: Cond) -> Tensor:
        return self.transformer.logits(feats, self.transformer.class_vector(self._labels(cond)))

    # ---- sampling -------------------------------------------------------------------------------------
    # no_grad rather than inference_mode: ZeRO-3 re-gathers parameter data inside the call, and tensors made
    # in inference mode cannot be used by autograd afterwards (deepspeedai/DeepSpeed users hit exactly that).
    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
        return_log_probs: bool = False,
        pick: TokenPicker | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """KV-cached next-scale sampler -> ids (B, N); with ``return_log_probs`` also the (B, N, V) log-probs
        each scale was drawn from (the same CFG / top-k / top-p rule as :meth:`log_probs`).

        One forward per scale over that scale's tokens only (2B rows when CFG is on), the past read from
        preallocated per-block K/V caches. ``pick(lp (B, n, V), scale slice)`` chooses each scale's ids instead of
        a multinomial draw (see :data:`TokenPicker`).
        """
        sampling = sampling or self.default_sampling
        tr, tok = self.transformer, self.tokenizer
        labels = self._labels(cond)
        B, V, S = labels.shape[0], self.vocab_size, len(self.patch_nums)
        weights = guidance_weights(sampling, self.step_of_token, S)
        use_cfg = bool((weights != 1).any())
        rows = 2 * B if use_cfg else B
        all_labels = torch.cat([labels, self.null_cond(B).labels]) if use_cfg else labels
        dtype, device = tr.pos_1LC.dtype, tr.pos_1LC.device
        caches = [
            LayerKVCache(rows, tr.num_heads, self.num_tokens, tr.width // tr.num_heads, dtype, device)
            for _ in tr.blocks
        ]
        cond_BD, x, lvl_pos = tr(None, all_labels)
        # the AdaLN modulations depend on the class only: computed once, not once per scale
        block_ada = [blk.ada_lin(cond_BD) for blk in tr.blocks]
        head_ada = tr.head_nm.ada_lin(cond_BD)
        codebook = self.codebook()
        f_hat = None
        ids_out, lp_out = [], []
        for k, sl in enumerate(self.steps):
            for blk, cache, ada in zip(tr.blocks, caches, block_ada):
                x = blk(x, None, None, cache, ada)
            logits = tr.logits(x, None, head_ada)
            if use_cfg:
                lp = process_logits(logits[:B], logits[B:], weights[sl], sampling)
            else:
                lp = process_logits(logits, None, weights[sl], sampling)
            if pick is None:
                ids = torch.multinomial(lp.exp().reshape(-1, V), 1, generator=generator).view(B, -1)
            else:
                ids = pick(lp, sl)
            ids_out.append(ids)
            if return_log_probs:
                lp_out.append(lp)
            f_hat, nxt = tok.next_scale_input(k, f_hat, codebook[ids])
            if nxt is not None:
                x = tr.word_embed(nxt.to(dtype)) + lvl_pos[self.steps[k + 1]]
                if use_cfg:
                    x = torch.cat([x, x], dim=0)
        ids = torch.cat(ids_out, dim=1)
        return (ids, torch.cat(lp_out, dim=1)) if return_log_probs else ids

    # ---- pixels ---------------------------------------------------------------------------------------
    def decode(self, x: Tensor) -> Tensor:
        return self.tokenizer.decode_vectors(self._vectors(x))

    def encode(self, img: Tensor) -> Tensor:
        return self.tokenizer.img_to_flat_ids(img)
