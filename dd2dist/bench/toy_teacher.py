"""A tiny, enumerable, strongly correlated teacher of the real classes (the exact one-step check,
``jobs/benchmark.py toy``).

The teacher is a real :class:`~dd2dist.teachers.var.VARTeacher` or
:class:`~dd2dist.teachers.llamagen.LlamaGenTeacher` with a fixed, well-separated codebook of V codes in R^Ce and
so few tokens N that all V^N sequences can be enumerated. Its transformer is fitted by maximum likelihood to a
random lookup-table AR distribution (one per class, sharp conditionals that depend on the prefix), then frozen.
What DD2 is checked against is the *fitted transformer* with the target sampling rule (CFG etc.), not the table:
the table only makes the teacher correlated.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from dd2dist.conditions import Cond
from dd2dist.teachers import build_family
from dd2dist.teachers.arch import LlamaGenConfig, VARConfig, VARVQConfig, VQ16Config
from dd2dist.teachers.base import ARTeacher

Dependence = Literal["prefix", "markov"]


@dataclass(frozen=True)
class ToyTeacherSpec:
    """What the toy teacher looks like and how it is fitted.

    ``dependence``: "prefix" gives every full prefix (all tokens of earlier AR steps) its own conditional;
    "markov" lets a token depend only on the tokens of the previous AR step (first-order, easier).
    ``sharpness`` scales the table's random logits: larger = sharper conditionals = a more correlated joint. The
    first AR step uses ``first_sharpness`` instead: a sharp first token would leave nothing to correlate with.
    """

    family: Literal["var", "llamagen"] = "var"
    vocab: int = 4
    embed_dim: int = 3
    patch_nums: tuple[int, ...] = (1, 2)  # VAR layout
    grid: int = 2  # LlamaGen layout: grid x grid raster
    num_classes: int = 2
    width: int = 32  # transformer width (VAR width / LlamaGen dim): the students' backbone, so keep it small
    depth: int = 2
    heads: int = 2
    code_spacing: float = 1.15  # min distance between raw VAR codes (LlamaGen codes are unit vectors)
    dependence: Dependence = "prefix"
    sharpness: float = 3.0
    first_sharpness: float = 0.5  # the first AR step's scale: a near-uniform start, so later steps have a prefix
    fit_steps: int = 400
    fit_lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in ("var", "llamagen"):
            raise ValueError(f"toy family must be 'var' or 'llamagen', got {self.family!r}")
        if self.vocab < 2 or self.embed_dim < 1 or self.num_classes < 1:
            raise ValueError(f"toy vocab >= 2, embed_dim >= 1, num_classes >= 1; got {self.vocab}, "
                             f"{self.embed_dim}, {self.num_classes}")
        if self.vocab ** self.num_tokens > 1 << 16:
            raise ValueError(f"V^N = {self.vocab}^{self.num_tokens} sequences is too many to enumerate (max 65536)")

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums) if self.family == "var" else self.grid * self.grid


# ---------------------------------------------------------------------------------------------------------
# codebook
# ---------------------------------------------------------------------------------------------------------


def toy_codebook(vocab: int, embed_dim: int, spacing: float, seed: int = 0) -> Tensor:
    """(V, Ce) fixed codes, pairwise distance >= ``spacing``, all of the same norm.

    Codes are chosen among the hypercube vertices {-1, 1}^Ce (the even-parity half when V <= 2^(Ce-1)) by
    farthest-point selection when V <= 2^Ce (V=4, Ce=3 gives a regular tetrahedron, V=8 the cube), else seeded
    Gaussian directions; then scaled so that the closest pair is exactly ``spacing`` apart.
    """
    if vocab <= 2**embed_dim:
        verts = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=embed_dim)))
        if embed_dim > 1 and vocab <= 2 ** (embed_dim - 1):
            # even-parity vertices are pairwise >= 2*sqrt(2) apart (a greedy pick over all vertices is not)
            verts = verts[(verts < 0).sum(1) % 2 == 0]
        chosen = [0]
        while len(chosen) < vocab:
            d = torch.cdist(verts, verts[chosen]).min(1).values
            d[chosen] = -1
            chosen.append(int(d.argmax()))
        codes = verts[chosen]
    else:
        g = torch.Generator().manual_seed(seed)
        codes = torch.randn(vocab, embed_dim, generator=g)
    codes = codes / codes.norm(dim=-1, keepdim=True)
    dist = torch.cdist(codes, codes) + torch.eye(vocab) * 1e9
    min_dist = float(dist.min())
    if min_dist < 1e-6:
        raise ValueError(f"toy codebook of {vocab} codes in R^{embed_dim} has coincident codes")
    return codes * (spacing / min_dist)


# ---------------------------------------------------------------------------------------------------------
# enumeration and the lookup-table target
# ---------------------------------------------------------------------------------------------------------


def all_sequences(vocab: int, num_tokens: int) -> Tensor:
    """(V^N, N) int64: every id sequence, in the order of :func:`sequence_index` (first token most significant)."""
    idx = torch.arange(vocab**num_tokens)
    powers = vocab ** torch.arange(num_tokens - 1, -1, -1)
    return (idx[:, None] // powers[None]) % vocab


def sequence_index(ids: Tensor, vocab: int) -> Tensor:
    """ids (..., N) -> the row of that sequence in :func:`all_sequences` (...)."""
    N = ids.shape[-1]
    powers = vocab ** torch.arange(N - 1, -1, -1, device=ids.device)
    return (ids.long() * powers).sum(-1)


def step_of_tokens(spec: ToyTeacherSpec) -> list[int]:
    """The AR step of each token in the flat layout (VAR: scale; LlamaGen: position)."""
    if spec.family == "var":
        return [k for k, p in enumerate(spec.patch_nums) for _ in range(p * p)]
    return list(range(spec.num_tokens))


def _context_tokens(steps: list[int], dependence: Dependence) -> list[list[int]]:
    """For each token, the token positions its table conditional depends on."""
    out = []
    for k in steps:
        if dependence == "prefix":
            out.append([j for j, kj in enumerate(steps) if kj < k])
        else:
            out.append([j for j, kj in enumerate(steps) if kj == k - 1])
    return out


def table_log_probs(spec: ToyTeacherSpec, seqs: Tensor) -> Tensor:
    """Target conditionals for every sequence: (C, S, N, V) log p_table(q_i = v | context of i, class).

    Each (class, token, context) triple gets its own logit vector ``sharpness * N(0, I)`` (``first_sharpness`` on
    the first AR step) from a generator seeded by ``spec.seed``: the table is a deterministic function of the spec.
    """
    steps = step_of_tokens(spec)
    ctx = _context_tokens(steps, spec.dependence)
    V, N, C = spec.vocab, spec.num_tokens, spec.num_classes
    max_ctx = max((len(c) for c in ctx), default=0)
    g = torch.Generator().manual_seed(10_000 + spec.seed)
    scale = torch.tensor([spec.first_sharpness if k == 0 else spec.sharpness for k in steps])
    logits = scale[None, :, None, None] * torch.randn(C, N, V**max_ctx, V, generator=g)
    out = torch.empty(C, seqs.shape[0], N, V)
    for i, c in enumerate(ctx):
        ctx_index = sequence_index(seqs[:, c], V) if c else torch.zeros(seqs.shape[0], dtype=torch.long)
        out[:, :, i] = torch.log_softmax(logits[:, i, ctx_index], dim=-1)
    return out


def table_joint(spec: ToyTeacherSpec, seqs: Tensor) -> Tensor:
    """(C, S) probabilities of every sequence under the lookup table, per class."""
    lp = table_log_probs(spec, seqs)
    idx = seqs[None, :, :, None].expand(lp.shape[0], -1, -1, 1)
    return lp.gather(-1, idx)[..., 0].sum(-1).exp()


# ---------------------------------------------------------------------------------------------------------
# the teacher: real class, fixed codebook, fitted transformer
# ---------------------------------------------------------------------------------------------------------


def teacher_arch(spec: ToyTeacherSpec) -> tuple[str, VARConfig | None, LlamaGenConfig | None]:
    """The family architecture of the toy teacher (tokenizer convs at their smallest; they are unused)."""
    if spec.family == "var":
        tok = VARVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, vocab_size=spec.vocab, embed_dim=spec.embed_dim)
        arch = VARConfig(depth=spec.depth, width=spec.width, num_heads=spec.heads, patch_nums=tuple(spec.patch_nums),
                         num_classes=spec.num_classes, tokenizer=tok)
        return "var", arch, None
    tok16 = VQ16Config(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, vocab_size=spec.vocab,
                       embed_dim=spec.embed_dim)
    # the mlp adapter takes continuous inputs natively (DD2's adapted LlamaGen, docs/method.md §6): the generator
    # feeds raw noise to the backbone and must not have it snapped to a code
    arch16 = LlamaGenConfig(n_layer=spec.depth, n_head=spec.heads, dim=spec.width, ffn_dim=4 * spec.width,
                            grid=spec.grid, num_classes=spec.num_classes, input_adapter="mlp", tokenizer=tok16)
    return "llamagen", None, arch16


def teacher_section_arch(spec: ToyTeacherSpec) -> dict:
    """The ``teacher`` config keys that rebuild this architecture (for the trainer's ``build_teacher``)."""
    family, var, lg = teacher_arch(spec)
    from dataclasses import asdict

    return {"family": family, "var" if family == "var" else "llamagen": asdict(var if family == "var" else lg)}


def _set_codebook(teacher: ARTeacher, codes: Tensor) -> None:
    with torch.no_grad():
        teacher.tokenizer.quantize.embedding.weight.copy_(codes)


def _transformer(teacher: ARTeacher) -> torch.nn.Module:
    return teacher.transformer if teacher.family == "var" else teacher.gpt


@dataclass
class FitReport:
    """How well the transformer matched the table: the class-conditional cross-entropy at the last fit step vs
    the table's own entropy, nats per sequence averaged over classes (their gap is the KL of the fit)."""

    cross_entropy: float
    table_entropy: float
    seconds: float


def _fit_rows(spec: ToyTeacherSpec) -> tuple[Tensor, Tensor, Tensor]:
    """The rows the fit needs: every assignment of the tokens that are ever *inputs* (all but the last AR step's),
    the last step's tokens set to 0 (they are never read: a row's log-probs depend only on earlier steps).

    Returns rows (R, N), their table marginals r (C, R) and the table conditionals at every position (C, R, N, V).
    """
    steps = step_of_tokens(spec)
    last = max(steps)
    inputs = [i for i, k in enumerate(steps) if k < last]
    free = all_sequences(spec.vocab, len(inputs))
    rows = torch.zeros(free.shape[0], spec.num_tokens, dtype=torch.long)
    rows[:, inputs] = free
    cond_lp = table_log_probs(spec, rows)  # (C, R, N, V)
    idx = rows[None, :, inputs, None].expand(cond_lp.shape[0], -1, -1, 1)
    marg = cond_lp[:, :, inputs].gather(-1, idx)[..., 0].sum(-1).exp()
    return rows, marg, cond_lp.exp()


def build_toy_teacher(spec: ToyTeacherSpec) -> tuple[ARTeacher, FitReport]:
    """Build, fit and freeze the toy teacher.

    The loss is the exact expected negative log-likelihood under the table over all sequences and classes,
    computed without enumerating them: the log-likelihood of a token depends only on the tokens of earlier AR
    steps, so by marginalisation it equals the soft cross-entropy against the table's conditional at every
    position, on one row per assignment of the input tokens, weighted by that assignment's table probability
    (:func:`_fit_rows`). The null class is fitted to the class mixture (linear in the target), so CFG has a
    meaningful unconditional branch. Full batch, deterministic.
    """
    import time

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    family, var, lg = teacher_arch(spec)
    teacher = build_family(family, var=var, llamagen=lg)
    _set_codebook(teacher, toy_codebook(spec.vocab, spec.embed_dim, spec.code_spacing, seed=spec.seed))
    rows, marg, target = _fit_rows(spec)  # (R, N), (C, R), (C, R, N, V)
    C, R = marg.shape
    seqs = all_sequences(spec.vocab, spec.num_tokens)
    joint = table_joint(spec, seqs)
    table_entropy = float(-(joint * joint.clamp_min(1e-30).log()).sum(1).mean())
    # per (class, row, position): the weighted soft target; the null rows see the mixture of all classes
    weighted = marg[:, :, None, None] * target  # (C, R, N, V)
    targets = torch.cat([weighted, weighted.mean(0, keepdim=True)], 0)  # (C+1, R, N, V)
    labels = torch.arange(C + 1).repeat_interleave(R)
    ids = rows.repeat(C + 1, 1)
    targets = targets.reshape(-1, spec.num_tokens, spec.vocab)

    net = _transformer(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=spec.fit_lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(spec.fit_steps, 1), eta_min=spec.fit_lr * 0.02)
    teacher.train()
    cond = Cond(labels=labels)
    ce = math.nan
    for _ in range(spec.fit_steps):
        lp = teacher.log_probs(ids, cond)  # the raw conditional distribution, (rows, N, V)
        nll = -(targets * lp).sum((1, 2))
        loss = nll.sum() / (C + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ce = float(nll[: C * R].sum().detach()) / C  # the class rows only, comparable to the table entropy
    teacher.freeze()
    return teacher, FitReport(cross_entropy=ce, table_entropy=table_entropy, seconds=time.perf_counter() - t0)


def spec_with(spec: ToyTeacherSpec, **kw) -> ToyTeacherSpec:
    """A copy of ``spec`` with fields changed."""
    return replace(spec, **kw)
