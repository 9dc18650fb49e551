"""LlamaGen (next-token, raster order) teacher: our own GPT, teacher-forced pass and static-KV-cache sampler.

Facts implemented here are docs/teachers.md §3.1 (Llama-style GPT: fp32 RMSNorm, SwiGLU, fused ``wqkv``, interleaved
2-D RoPE whose condition rows are zero, no biases), §3.4 (sampling: constant CFG, temperature, top-k, top-p), §3.3
(teacher forcing, continuous-input adapters) and §3.6 (text-to-image: caption projection, learned null caption,
left-padded text with the "causal AND key-valid OR diagonal" attention mask). Parameter names follow the released
``c2i_*.pt`` / ``t2i_*.pt`` files (under ``gpt.``) so :mod:`dd2dist.teachers.llamagen_official` maps them 1:1.

Departures from the released code: no dropout / drop-path and no class or caption dropout anywhere (the teacher is
frozen and evaluated), and our own random init (the released one zero-initialises the output head).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.conditions import Cond, Sampling, TokenPicker
from dd2dist.latent import guidance_weights, process_logits
from dd2dist.teachers.arch import LlamaGenConfig
from dd2dist.teachers.base import ARTeacher
from dd2dist.teachers.vq16 import VQ16

INPUT_ADAPTERS = ("snap", "soft", "mlp")
INIT_STD = 0.02


def ffn_hidden_dim(cfg: LlamaGenConfig) -> int:
    """SwiGLU width: ``cfg.ffn_dim`` if set, else int(8·dim/3) rounded up to ``multiple_of``."""
    if cfg.ffn_dim:
        return cfg.ffn_dim
    hidden = int(2 * (4 * cfg.dim) / 3)
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)


def rope_2d_cache(grid: int, head_dim: int, base: float, num_cond: int) -> Tensor:
    """2-D RoPE table (num_cond + grid², head_dim/2, 2) of (cos, sin), fp32.

    Rotary pair j < head_dim/4 turns by y·inv[j] and pair j >= head_dim/4 by x·inv[j - head_dim/4] for image token
    (y, x) in raster order, with inv = base^(-(0, 2, ..., half-2)/half), half = head_dim/2. The ``num_cond`` rows of
    the condition positions are all ZERO (cos = sin = 0, as released), so their rotated q and k are zero vectors.
    """
    if head_dim % 4:
        raise ValueError(f"llamagen head_dim (dim / n_head) must be divisible by 4 for 2-D RoPE, got {head_dim}")
    half = head_dim // 2
    # fp32 throughout, as released, so the table matches the official one bit for bit
    inv = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half))
    pos = torch.arange(grid, dtype=torch.float32)
    ang_axis = torch.outer(pos, inv)  # (grid, half/2)
    ang = torch.cat(
        [ang_axis[:, None, :].expand(grid, grid, -1), ang_axis[None, :, :].expand(grid, grid, -1)], dim=-1
    ).reshape(grid * grid, half)  # row-major (y, x): first half/2 pairs use y, the rest x
    table = torch.stack([ang.cos(), ang.sin()], dim=-1)
    return torch.cat([torch.zeros(num_cond, half, 2), table], dim=0)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of x (B, L, ..., hd) by rope (L, hd/2, 2), in fp32.

    Pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). Eager: one complex product (few kernels; the sampler's
    decode step is launch-bound). Under torch.compile: the same in real arithmetic, which Inductor can fuse
    (it generates no code for complex ops).
    """
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    r = rope.float().view(1, xs.shape[1], *([1] * (xs.dim() - 4)), xs.shape[-2], 2)
    if torch.compiler.is_compiling():
        x0, x1, cos, sin = xs[..., 0], xs[..., 1], r[..., 0], r[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(xs) * torch.view_as_complex(r))
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back, times a learnable weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Fused ``wqkv`` (no bias), 2-D RoPE on q and k, SDPA (scale 1/sqrt(hd)), ``wo``.

    With ``cache`` = (k_cache, v_cache) of shape (rows, H, Lmax, hd): if ``cache_pos`` is None the call is a
    prefill (keys written at 0..L-1, attention among the L new tokens only); otherwise one token is written at
    ``cache_pos`` (a (1,) long tensor) and attends to the whole cache under ``mask`` (unwritten slots masked).
    """

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        B, L, D = x.shape
        qkv = self.wqkv(x).view(B, L, 3, self.n_head, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)  # q and k rotated in one go
        q, k, v = (t.transpose(1, 2) for t in (q, k, qkv[:, :, 2]))  # (B, H, L, hd)
        if cache is not None:
            k_cache, v_cache = cache
            if cache_pos is None:
                k_cache[:, :, :L] = k
                v_cache[:, :, :L] = v
            else:
                k_cache.index_copy_(2, cache_pos, k)
                v_cache.index_copy_(2, cache_pos, v)
                if q.device.type == "cpu":
                    # one query row against the cache: on CPU the fused kernel takes ~2-3x longer than the plain
                    # product for this shape (the decode step of every KV-cached sampler)
                    scores = torch.matmul(q, k_cache.transpose(-1, -2)) * self.head_dim**-0.5
                    out = torch.matmul(torch.softmax(scores + mask, dim=-1), v_cache)
                    return self.wo(out.transpose(1, 2).reshape(B, L, D))
                k, v = k_cache, v_cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1)
        return self.wo(out.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_head)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden_dim(cfg))

    def forward(self, x, rope, mask, cache=None, cache_pos=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class prefix token: ``embedding_table`` (num_classes + 1, D); index num_classes is the CFG null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"cond.labels must be int64 (B,), got {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"cond.labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class)")
        return self.embedding_table(labels)[:, None, :]


class CaptionMLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, no biases."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text prefix: ``cap_proj`` of (B, T, caption_dim) T5 features; ``uncond_embedding`` (T, caption_dim) is the
    learned null caption (a buffer in the released files, so it is one here too)."""

    def __init__(self, num_tokens: int, caption_dim: int, dim: int):
        super().__init__()
        self.num_tokens, self.caption_dim = num_tokens, caption_dim
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(num_tokens, caption_dim) / caption_dim**0.5)

    def forward(self, text: Tensor) -> Tensor:
        if text.dim() != 3 or text.shape[1:] != (self.num_tokens, self.caption_dim):
            raise ValueError(
                f"cond.text must be (B, {self.num_tokens}, {self.caption_dim}) left-padded features, "
                f"got {tuple(text.shape)}"
            )
        return self.cap_proj(text.to(self.cap_proj.fc1.weight.dtype))


class LlamaGenGPT(nn.Module):
    """The LlamaGen transformer: condition prefix, token embeddings (or an input adapter), layers, norm, head."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        if cfg.dim % cfg.n_head:
            raise ValueError(f"llamagen.dim {cfg.dim} is not divisible by llamagen.n_head {cfg.n_head}")
        if cfg.input_adapter not in INPUT_ADAPTERS:
            raise ValueError(f"llamagen.input_adapter must be one of {INPUT_ADAPTERS}, got {cfg.input_adapter!r}")
        if cfg.caption_dim <= 0 and cfg.cls_token_num != 1:
            raise ValueError(f"class-conditional llamagen has one prefix token; got cls_token_num={cfg.cls_token_num}")
        self.cfg = cfg
        V, D = cfg.tokenizer.vocab_size, cfg.dim
        self.num_cond = cfg.cls_token_num
        self.num_tokens = cfg.grid * cfg.grid
        self.tok_embeddings = nn.Embedding(V, D)
        if cfg.caption_dim > 0:
            self.cls_embedding: nn.Module = CaptionEmbedder(cfg.cls_token_num, cfg.caption_dim, D)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, D)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.output = nn.Linear(D, V, bias=False)
        if cfg.input_adapter == "mlp":
            hidden = cfg.adapter_hidden or D
            self.input_mlp = nn.Sequential(
                nn.Linear(cfg.tokenizer.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                nn.Linear(hidden, D),
            )
        self.vector_input: nn.Module | None = None  # a student may add one (soft rule only)
        self.init_buffers(self.output.weight.device)
        self.reset_parameters()

    def init_buffers(self, device) -> None:
        """(Re)compute the derived non-persistent RoPE table (after a meta-device build, call with a real device)."""
        cfg = self.cfg
        rope = rope_2d_cache(cfg.grid, cfg.dim // cfg.n_head, cfg.rope_base, self.num_cond)
        self.register_buffer("rope", rope.to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Our own random init: N(0, 0.02) weights, unit norm weights, default init for the adapter MLP."""
        for name, m in self.named_modules():
            if name.startswith(("input_mlp", "vector_input")):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=INIT_STD)

    # ---- inputs ---------------------------------------------------------------------------------------
    def cond_embeddings(self, cond: Cond) -> Tensor:
        """The condition prefix (B, T, D)."""
        if isinstance(self.cls_embedding, CaptionEmbedder):
            if cond.text is None or cond.text_mask is None:
                raise ValueError("text-to-image llamagen needs cond.text (B, T, caption_dim) and cond.text_mask (B, T)")
            return self.cls_embedding(cond.text)
        if cond.labels is None:
            raise ValueError("class-conditional llamagen needs cond.labels (num_classes = null class)")
        return self.cls_embedding(cond.labels)

    def embed_inputs(self, x: Tensor, codebook: Tensor) -> Tensor:
        """Token inputs (B, n) ids or (B, n, Ce) vectors -> (B, n, D) through the configured input adapter.

        snap: ids -> ``tok_embeddings``; vectors -> the id of the largest dot product with the normalised codebook.
        soft: ids -> ``tok_embeddings``; vectors -> softmax(x·cᵀ/τ) @ ``tok_embeddings`` (the snap limit as τ -> 0).
        mlp: ids -> their unit code vectors; vectors -> ``input_mlp`` (``tok_embeddings`` is unused).
        """
        adapter = self.cfg.input_adapter
        if not x.is_floating_point():
            if adapter != "mlp":
                return self.tok_embeddings(x)
            x = codebook[x]
        if adapter == "snap":
            return self.tok_embeddings((x.float() @ codebook.T).argmax(-1))
        if adapter == "soft":
            weights = soft_input_weights(x, codebook, self.cfg.soft_tau)
            h = weights.to(self.tok_embeddings.weight.dtype) @ self.tok_embeddings.weight
            # a student's continuous path (dd2dist.nets.vector_input): teachers have none
            return h if self.vector_input is None else h + self.vector_input(x)
        return self.input_mlp(x.to(self.input_mlp[0].weight.dtype))

    # ---- passes ---------------------------------------------------------------------------------------
    def forward_hidden(self, h: Tensor, mask: Tensor | None, caches: list | None = None) -> Tensor:
        """Run the layers + final ``norm`` on a full prefix h (B, L, D) at positions 0..L-1 (causal if mask None)."""
        rope = self.rope[: h.shape[1]]
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
        return self.norm(h)

    def decode_step(self, h: Tensor, pos: Tensor, mask: Tensor, caches: list) -> Tensor:
        """One cached token per row: h (rows, 1, D) at position ``pos`` ((1,) long) -> fp32 logits (rows, V)."""
        rope = self.rope.index_select(0, pos)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, rope, mask, cache, pos)
        return self.output(self.norm(h))[:, 0].float()


# 2^-126 - 2^-149, exact in a Python float. Plain arithmetic, not torch ops: this module may first be imported
# inside a `torch.device("meta")` block (launch.preflight builds teachers there), where a tensor has no value.
LARGEST_SUBNORMAL_F32 = 2.0**-126 - 2.0**-149


def soft_input_weights(x: Tensor, codebook: Tensor, tau: float) -> Tensor:
    """The soft input rule's code weights softmax(x·cᵀ/τ) (..., V), fp32, with subnormal weights set to zero.

    At a sharp τ most far codes' weights underflow into fp32 subnormals, which x86 CPUs multiply several times
    slower (measured: the mix with ``tok_embeddings`` took 1.06 ms instead of 0.18 at batch 64 of the digits
    generator); zeroing them moves each weight by less than 1.2e-38. One ``threshold`` op (keep w > the largest
    subnormal) instead of a compare and a masked fill: at batch 1 the generator's cost is its op count.
    """
    weights = torch.softmax((x.float() @ codebook.T) / tau, dim=-1)
    return F.threshold(weights, LARGEST_SUBNORMAL_F32, 0.0)


def text_attention_mask(text_mask: Tensor, length: int) -> Tensor:
    """(B, 1, L, L) bool attention mask of a text-conditioned sequence (True = attend).

    causal AND key-valid (the T text keys follow ``text_mask``; image keys are always valid), OR the diagonal, so
    padded text rows attend to themselves and stay finite.
    """
    B, T = text_mask.shape
    dev = text_mask.device
    key_valid = torch.cat([text_mask.bool(), torch.ones(B, length - T, dtype=torch.bool, device=dev)], dim=1)
    causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(length, dtype=torch.bool, device=dev)
    return ((causal[None] & key_valid[:, None, :]) | eye[None])[:, None]


class LlamaGenTeacher(ARTeacher):
    """LlamaGen class- or text-conditional teacher: GPT (``self.gpt``) + VQ-16 tokenizer (``self.tokenizer``)."""

    family = "llamagen"
    sample_returns_log_probs = True

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.gpt = LlamaGenGPT(cfg)
        self.tokenizer = VQ16(cfg.tokenizer)
        self.vocab_size = cfg.tokenizer.vocab_size
        self.embed_dim = cfg.tokenizer.embed_dim
        self.num_tokens = cfg.grid * cfg.grid
        self.num_classes = cfg.num_classes
        self.hidden_dim = cfg.dim
        self.num_cond = cfg.cls_token_num
        self.latent_hw = (cfg.grid, cfg.grid)
        self.steps = [slice(i, i + 1) for i in range(self.num_tokens)]
        self.register_buffer("step_of_token", torch.arange(self.num_tokens), persistent=False)
        self.default_sampling = Sampling(
            guidance_scale=2.0, guidance_schedule="constant", top_k=min(900, self.vocab_size), top_p=1.0
        )
        # sampler-only state kept out of the module tree (plain dict: never in state_dict / parameters()):
        # dtype -> (weights key, cast GPT copy, compiled decode step or None)
        self._sampler_cache: dict = {}

    @property
    def is_text(self) -> bool:
        return self.cfg.caption_dim > 0

    def init_buffers(self, device) -> None:
        """Recompute derived buffers on ``device`` (after loading into a meta-device build)."""
        self.gpt.init_buffers(device)
        self.register_buffer("step_of_token", torch.arange(self.num_tokens, device=device), persistent=False)

    # ---- codebook space -------------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        return self.tokenizer.codebook()

    # ---- conditioning ---------------------------------------------------------------------------------
    def null_cond(self, batch_size: int, like: Cond | None = None) -> Cond:
        if not self.is_text:
            device = self.step_of_token.device
            return Cond(labels=torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))
        null = self.gpt.cls_embedding.uncond_embedding
        text = null[None].expand(batch_size, *null.shape)
        if like is not None and like.text_mask is not None:
            mask = like.text_mask
        else:
            mask = torch.ones(batch_size, null.shape[0], dtype=torch.bool, device=null.device)
        return Cond(text=text, text_mask=mask)

    def _check_cond(self, cond: Cond, batch: int) -> None:
        if self.is_text:
            if cond.text is None or cond.text_mask is None:
                raise ValueError("text-to-image llamagen needs cond.text and cond.text_mask")
            if cond.text_mask.shape != (batch, self.num_cond):
                raise ValueError(
                    f"cond.text_mask must be (B, {self.num_cond}) = {(batch, self.num_cond)}, "
                    f"got {tuple(cond.text_mask.shape)}"
                )
        elif cond.labels is None:
            raise ValueError("class-conditional llamagen needs cond.labels (num_classes = null class)")
        if cond.batch_size != batch:
            raise ValueError(f"cond has batch {cond.batch_size} but x has batch {batch}")

    def _check_x(self, x: Tensor) -> None:
        ok_ids = x.dim() == 2 and not x.is_floating_point()
        ok_vec = x.dim() == 3 and x.is_floating_point() and x.shape[2] == self.embed_dim
        if not (ok_ids or ok_vec) or x.shape[1] != self.num_tokens:
            raise ValueError(
                f"x must be ids (B, {self.num_tokens}) or vectors (B, {self.num_tokens}, {self.embed_dim}), "
                f"got {tuple(x.shape)} ({x.dtype})"
            )

    # ---- teacher-forced passes ------------------------------------------------------------------------
    def features(self, x: Tensor, cond: Cond) -> Tensor:
        """[cond prefix] + adapter(x[:, :-1]) -> causal pass -> normed rows T-1 .. T+N-2: (B, N, D)."""
        self._check_x(x)
        B = x.shape[0]
        self._check_cond(cond, B)
        gpt = self.gpt
        prefix = gpt.cond_embeddings(cond)
        tokens = gpt.embed_inputs(x[:, :-1], self.codebook())
        h = torch.cat([prefix, tokens.to(prefix.dtype)], dim=1)
        mask = text_attention_mask(cond.text_mask, h.shape[1]) if self.is_text else None
        return gpt.forward_hidden(h, mask)[:, self.num_cond - 1 :]

    def head_logits(self, feats: Tensor, cond: Cond | None = None) -> Tensor:
        """``output`` on the normed features, fp32 (B, N, V)."""
        return self.gpt.output(feats).float()

    # ---- sampling -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(
        self,
        cond: Cond,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
        return_log_probs: bool = False,
        dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
        compile_step: bool = False,
        pick: TokenPicker | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Static-KV-cache AR sampler -> ids (B, N); with ``return_log_probs`` also the (B, N, V) log-probs each
        token was drawn from (the same CFG / temperature / top-k / top-p rule as :meth:`log_probs`).

        Caches (rows, H, round_up(T+N, 8), hd) are preallocated (rows = 2B with CFG: [cond; null]); one prefill of
        the T condition tokens, then N-1 one-token decode steps of identical shapes. ``dtype`` (e.g. bf16) runs a
        cast copy of the GPT in that precision (logits stay fp32); the copy is cached until a weight changes.
        ``cuda_graph`` (default: on for CUDA) captures the decode step once per call and replays it.
        ``compile_step`` additionally fuses the decode step with ``torch.compile`` (compiled once per batch size).
        ``pick(lp (B, 1, V), step)`` chooses each token instead of a multinomial draw (see :data:`TokenPicker`).
        """
        sampling = sampling or self.default_sampling
        B = cond.batch_size
        self._check_cond(cond, B)
        gpt, step_fn = self._inference_gpt(dtype, compile_step)
        device = gpt.output.weight.device
        cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        weights = guidance_weights(sampling, self.step_of_token, len(self.steps))
        use_cfg = bool((weights != 1).any())
        step_weights = weights.tolist()  # host floats: no device sync per step
        all_cond = Cond.cat([cond, self.null_cond(B, like=cond)]) if use_cfg else cond
        rows, T, N, V = (2 * B if use_cfg else B), self.num_cond, self.num_tokens, self.vocab_size
        cfg = self.cfg
        hd = cfg.dim // cfg.n_head
        max_len = (T + N + 7) // 8 * 8
        act_dtype = gpt.output.weight.dtype
        caches = [
            (torch.zeros(rows, cfg.n_head, max_len, hd, dtype=act_dtype, device=device),
             torch.zeros(rows, cfg.n_head, max_len, hd, dtype=act_dtype, device=device))
            for _ in gpt.layers
        ]
        # keys a decode-step query may see: valid text slots, and image slots up to its own position
        key_valid = torch.ones(rows, 1, 1, max_len, dtype=torch.bool, device=device)
        if self.is_text:
            key_valid[:, 0, 0, :T] = all_cond.text_mask.bool()
        slots = torch.arange(max_len, device=device)
        codebook = self.codebook()

        step_in = torch.zeros(rows, 1, cfg.dim, dtype=act_dtype, device=device)
        step_pos = torch.full((1,), T, dtype=torch.long, device=device)

        def decode() -> Tensor:
            # additive mask in the activation dtype, built once per step (a bool mask is converted in every layer)
            mask = torch.zeros((), dtype=act_dtype, device=device).masked_fill(
                ~(key_valid & (slots <= step_pos)), float("-inf")
            )
            return step_fn(step_in, step_pos, mask, caches)

        run_decode = _capture(decode) if (cuda_graph and N > 1) else decode

        prefix = gpt.cond_embeddings(all_cond)
        mask = text_attention_mask(all_cond.text_mask, T) if self.is_text else None
        h = gpt.forward_hidden(prefix, mask, caches)
        logits = gpt.output(h[:, -1]).float()

        ids = torch.empty(B, N, dtype=torch.long, device=device)
        lps = torch.empty(B, N, V, dtype=torch.float32, device=device) if return_log_probs else None
        for i in range(N):
            if use_cfg:
                lp = process_logits(logits[:B], logits[B:], step_weights[i], sampling)
            else:
                lp = process_logits(logits, None, step_weights[i], sampling)
            if pick is None:
                tok = torch.multinomial(lp.exp(), 1, generator=generator)[:, 0]
            else:
                tok = pick(lp[:, None], self.steps[i])[:, 0]
            ids[:, i] = tok
            if lps is not None:
                lps[:, i] = lp
            if i == N - 1:
                break
            emb = gpt.embed_inputs(tok[:, None], codebook).to(act_dtype)
            step_in.copy_(torch.cat([emb, emb], 0) if use_cfg else emb)
            step_pos.fill_(T + i)
            logits = run_decode()
        return (ids, lps) if return_log_probs else ids

    def _inference_gpt(self, dtype: torch.dtype | None, compile_step: bool):
        """(GPT to sample with, its decode-step function): ``self.gpt`` itself, or a cached copy cast to ``dtype``.

        The cache key holds every parameter's storage and in-place version counter, so fine-tuning or loading
        weights rebuilds the copy. A compiled step is cached with it (recompiling per call would be slow).
        """
        base_dtype = self.gpt.output.weight.dtype
        dtype = dtype or base_dtype
        if dtype == base_dtype and not compile_step:
            return self.gpt, self.gpt.decode_step
        key = tuple((p.data_ptr(), p._version) for p in self.gpt.parameters())
        entry = self._sampler_cache.get(dtype)
        if entry is None or entry[0] != key:
            gpt = self.gpt if dtype == base_dtype else copy.deepcopy(self.gpt).to(dtype)
            entry = (key, gpt, None)
        if compile_step and entry[2] is None:
            entry = (entry[0], entry[1], torch.compile(entry[1].decode_step, fullgraph=True, dynamic=False))
        self._sampler_cache[dtype] = entry
        return entry[1], (entry[2] if compile_step else entry[1].decode_step)

    # ---- pixels ---------------------------------------------------------------------------------------
    def decode(self, x: Tensor) -> Tensor:
        """ids or vectors -> images clamped to [-1, 1] (the interface's range; the raw VQ-16 output overshoots a
        little, and the released scripts clamp too before converting to uint8)."""
        self._check_x(x)
        if not x.is_floating_point():
            img = self.tokenizer.decode_ids(x, self.cfg.grid)
        else:
            img = self.tokenizer.decode_vectors(x, self.cfg.grid)
        return img.clamp(-1, 1)

    def encode(self, img: Tensor) -> Tensor:
        ids = self.tokenizer.encode_ids(img)
        if ids.shape[1] != self.num_tokens:
            raise ValueError(
                f"image of side {tuple(img.shape[-2:])} gives {ids.shape[1]} tokens; this teacher expects "
                f"{self.num_tokens} (grid {self.cfg.grid})"
            )
        return ids


def _capture(step):
    """CUDA-graph a zero-argument step that reads/writes only static tensors; returns a replay function whose
    output tensor is overwritten on each call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (allocator, kernels) before capture, as CUDA graphs require
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay
