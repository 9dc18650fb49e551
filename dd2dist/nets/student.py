"""The student network: a trainable copy of the teacher backbone plus the MLP head (one class, two roles).

* guidance ψ (and the stage-1 AR-diffusion model): ``features(q, cond)`` teacher-forced on a clean (detached)
  sequence, then ``velocity(x_t, t, feats)`` per position;
* generator θ: ``generate(eps, cond)`` feeds the noise itself to the backbone — the teacher's ``features`` has the
  one-AR-step shift built in, so row i sees only the noise of earlier AR steps — and the head maps each
  position's own noise to ``q_i = eps_i - v(eps_i, t=generator_time, f_i)``: one Euler step from t=1 to 0, the
  whole sequence in one pass (docs/method.md §4, §5.4).

VAR variant of "shift by one scale" (docs/method.md §5.5, §12.8): the noise of scales < k is treated as code vectors in
VAR's own next-scale input construction (accumulate f_hat through the φ convs, area-downsample, ``word_embed``);
that is exactly ``VARTeacher.features`` on the noise sequence. We chose it over DD1's extra 1x1 level because it
reuses the teacher's input path unchanged and keeps the same causal dependency.

What is dropped from the copied teacher: the classifier head (VAR ``head``/``head_nm``, LlamaGen ``output``), the
tokenizer's encoder/decoder and quant convs, and LlamaGen's ``tok_embeddings`` when a trained ``input_mlp`` reads
every input instead (see below). What stays frozen: the parts of the tokenizer that define the latent space (the
codebook and VAR's φ convs) become buffers, so they are saved with the student but never trained, and every
*parameter* of a StudentNet is trainable (``Engine.assert_mode`` checks all of them together).

LlamaGen: the student's inputs are continuous (generator noise, the generator's continuous outputs). A teacher that
already reads vectors through a trained ``mlp`` adapter (a stage-0 adapted teacher) is copied as it is. Otherwise
the student reads vectors through the teacher's own ``soft`` rule, ``softmax(x·Cᵀ/τ) @ tok_embeddings``, with a
sharp τ (:func:`sharp_soft_tau`): on code vectors it equals the teacher's ``snap`` lookup to within 1% of the
weight, elsewhere it is a convex mix of embedding rows, so an input can never outweigh the class prefix in the
residual stream; ``tok_embeddings`` stays a trainable table (docs/method.md §12.7). Why not a fresh ``input_mlp``
regressed onto ``tok_embeddings`` over the 64 codes of the digits teacher, as measured: exact on codes (norm 0.27) it
returned norm 359 on N(0, I) noise, so the generator's token rows swamped the class (class-driven feature change 0.01 at
positions >= 1 against 9.1 for the teacher on the same noise), and trained, it blew up to norm 609 on codes within
50 stage-1 steps: stage 1 lost the class (AR-diffusion class consistency 0.12 against 0.57 with this rule).

Posterior head (``student.posterior_head``): the velocity is the closed-form posterior velocity of a mixture
over the codes whose log-probs are the student's own code logits, ``log_softmax(code_logits(f_i))``, plus the MLP head
as a correction. ``code_logits`` starts as a copy of the teacher's output layer, so on a code prefix the stage-1 model
and the guidance network start at the teacher's own (unguided) conditionals instead of learning them through the MLP.
Measured on the digits LlamaGen teacher after the demo's 500 stage-1 steps (the stage-1 model as an AR-diffusion
sampler, 10,000 samples): dependence captured -0.87 and a teacher NLL gap of 60.3 nats per sequence with the plain head
(and the stage-1 LR of 1e-3; the product of marginals: 66.8), 0.96 and 6.6 with the posterior head at 1e-4
(docs/results.md §3). VAR's output layer reads ``head_nm(h, class)``: a VAR posterior-head backbone keeps ``head_nm``
and returns its output as the features, so ``code_logits`` is a copy of ``head`` alone.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.conditions import Cond
from dd2dist.latent import posterior
from dd2dist.nets.categorical import pick_codes, principal_order
from dd2dist.nets.head import MLPHead
from dd2dist.nets.neighbour_picks import NeighbourPicks
from dd2dist.nets.output_snap import code_spacing, soft_snap
from dd2dist.nets.vector_input import NOISE_INPUTS, VectorInput
from dd2dist.teachers.base import ARTeacher

log = logging.getLogger("dd2dist.nets")

SOFT_SELF_WEIGHT = 0.99  # each code keeps >= 99% of its own soft-adapter weight: the student equals the teacher
SOFT_TAU_MIN = 1e-4  # floor for degenerate codebooks (near-duplicate codes would otherwise ask for tau -> 0)
DUPLICATE_MARGIN = 1e-6  # cosines above 1 - this count as the same code
POSTERIOR_T_FLOOR = 1e-3  # the posterior head's own floor of t; the losses draw t >= their t_min, above it


def params_to_buffers(module: nn.Module) -> None:
    """Turn every parameter under ``module`` into a (persistent) buffer of the same name: frozen, still saved."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach())


def _drop(module: nn.Module, *names: str) -> None:
    for name in names:
        if hasattr(module, name):
            setattr(module, name, None)


def sharp_soft_tau(codebook: Tensor, self_weight: float = SOFT_SELF_WEIGHT, chunk: int = 1024) -> float:
    """The largest softmax temperature at which every code keeps at least ``self_weight`` of its own soft weight.

    For unit codes, code j's own weight is ``1 / (1 + sum_i exp(-(1 - c_i·c_j) / τ))``
    >= ``1 / (1 + (V - 1) exp(-m / τ))`` with m the smallest margin ``1 - c_i·c_j`` over distinct codes, so
    τ = m / ln((V - 1) s / (1 - s)). Exact duplicate codes (margin ~0) are ignored; τ is floored at
    ``SOFT_TAU_MIN``.
    """
    if not 0.0 < self_weight < 1.0:
        raise ValueError(f"self_weight must lie in (0, 1), got {self_weight}")
    cb = F.normalize(codebook.detach().float(), dim=-1)
    V = cb.shape[0]
    if V < 2:
        return 1.0
    best = torch.full((V,), -2.0, device=cb.device)
    for s in range(0, V, chunk):  # (chunk, V) cosines at a time: a 16384-code Gram matrix would be 1 GiB
        cos = cb[s : s + chunk] @ cb.T
        cos[cos > 1.0 - DUPLICATE_MARGIN] = -2.0  # the code itself and exact duplicates
        best[s : s + chunk] = cos.max(-1).values
    margin = float((1.0 - best).min())
    tau = margin / math.log((V - 1) * self_weight / (1.0 - self_weight))
    return max(tau, SOFT_TAU_MIN)


def refresh_soft_tau(backbone: ARTeacher) -> None:
    """Set a soft-rule LlamaGen backbone's τ from its own codebook buffer (no-op for other backbones, and on the
    meta device, where there is no codebook to read yet)."""
    if backbone.family != "llamagen" or backbone.cfg.input_adapter != "soft":
        return
    codebook = backbone.codebook()
    if codebook.is_meta:
        return
    # same weights, only the vector-input rule differs; gpt.embed_inputs reads it from the config
    soft_cfg = replace(backbone.cfg, soft_tau=sharp_soft_tau(codebook))
    backbone.cfg = soft_cfg
    backbone.gpt.cfg = soft_cfg


def _llamagen_backbone(teacher: ARTeacher, noise_input: str = "none") -> ARTeacher:
    """A LlamaGen copy that reads continuous inputs (see the module docstring): the teacher's own ``mlp`` adapter,
    or its ``soft`` rule at :func:`sharp_soft_tau`, plus with ``noise_input="mlp"`` a zero-initialised
    :class:`~dd2dist.nets.vector_input.VectorInput` of the raw vector."""
    backbone = copy.deepcopy(teacher)
    if teacher.cfg.input_adapter == "mlp":
        return backbone
    backbone.cfg = replace(teacher.cfg, input_adapter="soft")
    backbone.gpt.cfg = backbone.cfg
    refresh_soft_tau(backbone)
    if noise_input == "mlp":
        device = backbone.gpt.tok_embeddings.weight.device
        backbone.gpt.vector_input = VectorInput(teacher.embed_dim, teacher.hidden_dim).to(device)
    log.info("student: LlamaGen inputs through the teacher's soft rule at tau %.3g%s", backbone.cfg.soft_tau,
             " plus a continuous input MLP" if noise_input == "mlp" else "")
    return backbone


def student_backbone(teacher: ARTeacher, noise_input: str = "none", posterior_head: bool = False) -> ARTeacher:
    """A pruned, trainable copy of the teacher that still implements ``features`` (see the module docstring);
    ``noise_input`` is ``student.noise_input``: ``mlp`` adds a zero-initialised continuous input path (LlamaGen: to
    each input's soft-rule embedding; VAR: each scale's raw vectors to the next scale's input embedding). A VAR copy
    for a posterior head keeps the class-modulated ``head_nm`` and returns its output as the features."""
    if noise_input not in NOISE_INPUTS:
        raise ValueError(f"student.noise_input must be one of {NOISE_INPUTS}, got {noise_input!r}")
    if teacher.family == "var":
        backbone = copy.deepcopy(teacher)
        _drop(backbone.transformer, "head")
        if noise_input == "mlp":
            backbone.vector_input = VectorInput(teacher.embed_dim, teacher.hidden_dim).to(
                backbone.transformer.word_embed.weight.device)
        if posterior_head:
            backbone.features_after_head_norm = True
        else:
            _drop(backbone.transformer, "head_nm")
    elif teacher.family == "llamagen":
        backbone = _llamagen_backbone(teacher, noise_input)
        _drop(backbone.gpt, "output")
        if backbone.cfg.input_adapter == "mlp":
            _drop(backbone.gpt, "tok_embeddings")  # unused: ids and vectors both go through input_mlp
    else:
        raise ValueError(f"unknown teacher family {teacher.family!r}")
    _drop(backbone.tokenizer, "encoder", "decoder", "quant_conv", "post_quant_conv")
    params_to_buffers(backbone.tokenizer)
    backbone.train()
    backbone.requires_grad_(True)
    return backbone


# where a posterior head's code logits come from: the teacher's output layer, whose input is the student's features
OUTPUT_LAYER = {"llamagen": "gpt.output", "var": "transformer.head"}


def teacher_output_layer(teacher: ARTeacher) -> nn.Linear:
    """The teacher's last linear layer (features -> code logits), which a posterior head copies."""
    if teacher.family not in OUTPUT_LAYER:
        raise ValueError(f"student.posterior_head: no output layer known for teacher family {teacher.family!r}")
    return teacher.get_submodule(OUTPUT_LAYER[teacher.family])


def pick_layout(teacher: ARTeacher) -> int | tuple[int, ...]:
    """What :class:`~dd2dist.nets.neighbour_picks.NeighbourPicks` walks: a LlamaGen teacher's raster side, or a VAR
    teacher's patch sizes."""
    return teacher.cfg.grid if teacher.family == "llamagen" else tuple(teacher.patch_nums)


def code_log_probs(code_logits: nn.Linear, feats: Tensor) -> Tensor:
    """The posterior head's mixture weights, fp32 log-probs (B, N, V) ``log_softmax(code_logits(feats))``. The
    layer is called as a module, like the teacher's output layer, so that ZeRO-3 gathers it through its own hooks."""
    return torch.log_softmax(code_logits(feats).float(), dim=-1)


def categorical_outputs(code_logits: nn.Linear, neighbour_picks: NeighbourPicks | None, feats: Tensor, eps: Tensor,
                        order: Tensor | None) -> tuple[Tensor, Tensor]:
    """A categorical generator's code log-probs (B, N, V), fp32, from its backbone features of the noise ``eps``,
    and the token ids (B, N) they pick at the noise's uniforms: the posterior head's, or, where the generator has
    :class:`~dd2dist.nets.neighbour_picks.NeighbourPicks`, read row by row beside the neighbours' picks (which that
    loop makes anyway: they are not picked twice)."""
    if neighbour_picks is None:
        log_probs = code_log_probs(code_logits, feats)
        return log_probs, pick_codes(log_probs, eps, order)
    return neighbour_picks(feats, eps, lambda row: code_log_probs(code_logits, row), order)


def mixture_velocity(log_probs: Tensor, codebook: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """The posterior head's mixture part, fp32 (B, N, Ce): the closed-form velocity at (x_t, t) of the mixture over
    ``codebook`` with ``log_probs`` (the teacher's own formula, :mod:`dd2dist.latent`).
    Outside autocast, like the teacher's posterior: a bf16 softmax over distances would blur close codes."""
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        return posterior(log_probs, codebook.float(), x_t.float(), t, t_min=POSTERIOR_T_FLOOR).velocity


def _check_noise(eps: Tensor, num_tokens: int, embed_dim: int) -> None:
    if eps.dim() != 3 or eps.shape[1:] != (num_tokens, embed_dim):
        raise ValueError(f"eps must be (B, {num_tokens}, {embed_dim}), got {tuple(eps.shape)}")


class StudentNet(nn.Module):
    """Teacher backbone + MLP head, velocity-predicting; the guidance network and the generator share it (a
    generator with ``student.generator_output: categorical`` outputs the codes its posterior head's code logits pick
    instead, see :mod:`dd2dist.nets.categorical`).

    Args:
        teacher: the (unpartitioned) teacher to copy; it is not modified.
        student_cfg: a :class:`dd2dist.config.schema.StudentConfig` (head_width, head_depth, time_embed_dim,
            generator_time).
        init_adapter: kept for callers that load weights right after construction; the backbone no longer
            fits anything at construction, so it changes nothing.
    """

    def __init__(self, teacher: ARTeacher, student_cfg, init_adapter: bool = True):
        super().__init__()
        posterior_head = bool(getattr(student_cfg, "posterior_head", False))
        self.backbone = student_backbone(teacher, getattr(student_cfg, "noise_input", "none"), posterior_head)
        # τ is a function of the codebook, which loading weights may replace (an exported student is loaded into a
        # randomly initialised build): recompute it after every load so training and sampling read alike
        self.register_load_state_dict_post_hook(lambda module, _incompatible: refresh_soft_tau(module.backbone))
        # the soft-snap output layer (dd2dist/nets/output_snap.py): its length is a function of the codebook too,
        # computed at first use and forgotten on every load for the same reason
        self.generator_snap = float(getattr(student_cfg, "generator_snap", 0.0))
        self._snap_length: float | None = None
        self.register_load_state_dict_post_hook(lambda module, _incompatible: setattr(module, "_snap_length", None))
        self.head = MLPHead(
            token_dim=teacher.embed_dim,
            cond_dim=teacher.hidden_dim,
            width=student_cfg.head_width,
            depth=student_cfg.head_depth,
            time_embed_dim=student_cfg.time_embed_dim,
        ).to(next(self.backbone.parameters()).device)
        self.generator_time = float(student_cfg.generator_time)
        self.generator_posterior = bool(getattr(student_cfg, "generator_posterior", True))
        self.num_tokens, self.embed_dim = teacher.num_tokens, teacher.embed_dim
        self.code_logits: nn.Linear | None = None
        if posterior_head:
            self.code_logits = copy.deepcopy(teacher_output_layer(teacher)).requires_grad_(True)
        self.generator_output = getattr(student_cfg, "generator_output", "continuous")
        self.categorical_order = getattr(student_cfg, "categorical_order", "index")
        if self.generator_output == "categorical" and self.code_logits is None:
            raise ValueError("student.generator_output: categorical outputs need student.posterior_head (their code "
                             "log-probs are the posterior head's code logits)")
        self.neighbour_picks: NeighbourPicks | None = None
        which = getattr(student_cfg, "neighbour_picks", "none")
        if which != "none":
            if self.generator_output != "categorical":
                raise ValueError("student.neighbour_picks needs a categorical generator")
            self.neighbour_picks = NeighbourPicks(teacher.vocab_size, teacher.hidden_dim, pick_layout(teacher),
                                                  which).to(self.code_logits.weight.device)
        # the principal code order is a function of the (frozen) codebook: computed once here, again after every load
        # (which may replace the codebook), not on every step; a buffer, so that it moves with the net
        self.register_buffer("principal_codes", None, persistent=False)
        self._refresh_code_order()
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module._refresh_code_order())

    def _refresh_code_order(self) -> None:
        codebook = self.backbone.codebook()
        if self.categorical_order == "principal" and not codebook.is_meta:
            self.principal_codes = principal_order(codebook)

    def features(self, seq: Tensor, cond: Cond) -> Tensor:
        """Backbone features (B, N, D) of a sequence (B, N, Ce); row i depends on earlier AR steps only."""
        return self.backbone.features(seq, cond)

    def code_log_probs(self, feats: Tensor) -> Tensor | None:
        """A posterior head's mixture log-probs (B, N, V) for :meth:`features` (None without one). Callers that run
        the head on several (x_t, t) of the same features compute them once and pass them to :meth:`velocity`: at
        LlamaGen-L size each D x V product costs ~6% of a backbone pass per token."""
        return None if self.code_logits is None else code_log_probs(self.code_logits, feats)

    def velocity(self, x_t: Tensor, t: Tensor | float, feats: Tensor, log_probs: Tensor | None = None) -> Tensor:
        """Head velocity (B, N, Ce) at noisy tokens x_t and times t (B, N) given :meth:`features` (with a posterior
        head: the mixture part plus the MLP head; ``log_probs``: :meth:`code_log_probs` of ``feats`` if known)."""
        v = self.head(x_t, t, feats)
        if self.code_logits is None:
            return v
        lp = self.code_log_probs(feats) if log_probs is None else log_probs
        return v + mixture_velocity(lp, self.backbone.codebook(), x_t, t).to(v.dtype)

    def correction(self, x_t: Tensor, t: Tensor | float, feats: Tensor) -> Tensor:
        """The MLP head alone (B, N, Ce): a guidance network built on the teacher's velocity
        (``stage2.guidance_base="teacher"``) adds it to that velocity, in place of its own mixture part."""
        return self.head(x_t, t, feats)

    def zero_head_output(self) -> None:
        """Zero the head's output layer, so that :meth:`correction` starts at exactly zero (the other head weights
        keep what stage 1 taught them and start learning once the output layer has moved)."""
        with torch.no_grad():
            self.head.final.linear.weight.zero_()
            self.head.final.linear.bias.zero_()

    def generator_outputs(self, eps: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """A categorical generator's code log-probs (B, N, V), fp32, each position's distribution given the noise of
        earlier AR steps, and the token ids (B, N) its noise picks from them (:mod:`dd2dist.nets.categorical`)."""
        _check_noise(eps, self.num_tokens, self.embed_dim)
        if self.code_logits is None:
            raise ValueError("generator_outputs needs a posterior head (student.posterior_head)")
        return categorical_outputs(self.code_logits, self.neighbour_picks, self.features(eps, cond), eps,
                                   self.code_order())

    def generator_log_probs(self, eps: Tensor, cond: Cond) -> Tensor:
        """The code log-probs of :meth:`generator_outputs`."""
        return self.generator_outputs(eps, cond)[0]

    def code_order(self) -> Tensor | None:
        """The order a categorical generator's CDF runs over the codes (``student.categorical_order``; None: index)."""
        return self.principal_codes

    def generate(self, eps: Tensor, cond: Cond, snap: bool = True) -> Tensor:
        """Generator role: noise (B, N, Ce) -> continuous tokens q = eps - v(eps, generator_time, features(eps)),
        through the soft-snap output layer where ``student.generator_snap`` sets one (``snap=False`` skips it: the
        PF-ODE regression fits the map before it, where a wrong code is not a saturated softmax). A categorical
        generator returns the code vectors it picks (no gradient: its loss reads :meth:`generator_outputs`)."""
        if self.generator_output == "categorical":
            with torch.no_grad():
                _, ids = self.generator_outputs(eps, cond)
                return self.backbone.codebook()[ids].to(eps.dtype)
        _check_noise(eps, self.num_tokens, self.embed_dim)
        feats = self.features(eps, cond)
        if not self.generator_posterior:  # the mixture is then the guidance network's only (generator_posterior)
            q = eps - self.head(eps, self.generator_time, feats).to(eps.dtype)
        else:
            q = eps - self.velocity(eps, self.generator_time, feats).to(eps.dtype)
        return self.snap_output(q) if snap else q

    def snap_length(self) -> float:
        """The soft snap's length scale: ``generator_snap`` x the codebook's median nearest-neighbour spacing (0: no
        snap)."""
        if self.generator_snap == 0.0:
            return 0.0
        if self._snap_length is None:
            self._snap_length = self.generator_snap * code_spacing(self.backbone.codebook())
        return self._snap_length

    def snap_output(self, q: Tensor) -> Tensor:
        """The generator's output layer: ``q`` itself, or its soft snap onto the codebook (``generator_snap`` > 0)."""
        if self.generator_snap == 0.0:
            return q
        return soft_snap(q, self.backbone.codebook(), self.snap_length()).to(q.dtype)

    def forward(self, eps: Tensor, cond: Cond) -> Tensor:
        """Same as :meth:`generate` (the generator is what gets exported and sampled)."""
        return self.generate(eps, cond)

    def for_sampling(self, head: nn.Module | None = None) -> OneStepSampler:
        """The generator as it is sampled: this backbone (shared, not copied) with a frozen :class:`FixedTimeHead`
        snapshot of the head at ``generator_time``. Take it after the weights are final (loaded or trained).

        ``head``: a fixed-time head to sample with instead, (x_t, feats) -> velocity at ``generator_time``, e.g. a
        :class:`dd2dist.nets.compact_head.CompactHead` fitted to this one."""
        return OneStepSampler(self, head)


class OneStepSampler(nn.Module):
    """Inference form of a generator (:meth:`StudentNet.for_sampling`): ``generate`` equals
    ``StudentNet.generate`` to fp32 rounding, with the head folded at the generator's fixed time (or, given one,
    another head at that time, such as a fitted compact head: then it approximates it).

    It exposes what the samplers read from a StudentNet (``backbone``, ``num_tokens``, ``embed_dim``), so
    :mod:`dd2dist.eval.sampling` and the speed benchmark take either.
    """

    def __init__(self, net: StudentNet, head: nn.Module | None = None):
        super().__init__()
        self.backbone = net.backbone
        if head is not None and getattr(head, "time", net.generator_time) != net.generator_time:
            raise ValueError(f"OneStepSampler: the head runs at t = {head.time}, the generator at "
                             f"t = {net.generator_time}")
        self.head = net.head.at_time(net.generator_time) if head is None else head
        # shared, like the backbone; a posterior head's mixture part stays exact (none: the generator runs without it),
        # and a categorical generator's outputs are its picks
        self.categorical = net.generator_output == "categorical"
        self.code_logits = net.code_logits if net.generator_posterior or self.categorical else None
        self.neighbour_picks = net.neighbour_picks
        self.register_buffer("code_order", net.code_order(), persistent=False)
        self.time = net.generator_time
        self.num_tokens, self.embed_dim = net.num_tokens, net.embed_dim
        self.snap_length = net.snap_length()

    @torch.no_grad()
    def generate(self, eps: Tensor, cond: Cond) -> Tensor:
        """Noise (B, N, Ce) -> continuous tokens q = eps - v(eps, head.time, features(eps))."""
        _check_noise(eps, self.num_tokens, self.embed_dim)
        feats = self.backbone.features(eps, cond)
        if self.categorical:  # the code each position's uniform picks (the head is not part of this generator)
            _, ids = categorical_outputs(self.code_logits, self.neighbour_picks, feats, eps, self.code_order)
            return self.backbone.codebook()[ids].to(eps.dtype)
        v = self.head(eps, feats)
        if self.code_logits is not None:
            lp = code_log_probs(self.code_logits, feats)
            v = v + mixture_velocity(lp, self.backbone.codebook(), eps, self.time).to(v.dtype)
        q = eps - v.to(eps.dtype)
        return q if self.snap_length == 0.0 else soft_snap(q, self.backbone.codebook(), self.snap_length).to(q.dtype)

    def forward(self, eps: Tensor, cond: Cond) -> Tensor:
        return self.generate(eps, cond)
