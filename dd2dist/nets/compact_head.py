"""A compact sampling head for a trained generator, fitted to its full head by regression (docs/method.md §12.4).

The one-step generator runs its head at one fixed time (t = 1), on its own noise eps_i and the backbone features
f_i(eps_<i, y). So after training the head is one function v(eps, f) on one known input distribution, and a smaller
net can be regressed onto it with as many exact draws of (eps, y) -> (eps_i, f_i, v_i) as it likes: no data, no
teacher, no loss of the training recipe. That matters where the backbone is small next to the head: at the digits
size the width-128, depth-2 head that the quality needs costs ~20% of a teacher-forced pass, against ~6% of the
paper's heads, and training with a narrower head throughout lost the quality targets (width 64 gave
1.73x / 1.77x the teachers' FID; its guidance network shrank with it).

:class:`CompactHead` is the AdaLN MLP head of :mod:`dd2dist.nets.head` at a fixed time, with its own width and
depth and, optionally, rank-``r`` AdaLN modulation (SiLU(c) -> r -> every shift / scale / gate): the modulation
projection is most of a full-rank head's multiply-adds. :func:`fit_compact_head` fits it; with the full head's
width and depth it starts from the full head (modulation from a truncated SVD), else from a fresh init.
It is a sampling form: the generator keeps training with its full head, and quality must be measured on the
compact one (jobs/demo.py evaluates both on the same noise). It is sampled folded (:meth:`CompactHead.folded`, the
same :class:`FixedTimeHead` layout the full head is sampled with).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.conditions import Cond
from dd2dist.nets.head import FixedTimeHead, fixed_time_velocity

COMPACT_HEAD_FILE = "generator_compact_head.safetensors"  # beside generator.safetensors in <run>/export


@dataclass(frozen=True)
class CompactHeadSpec:
    """Geometry of a :class:`CompactHead`: MLP ``width``, AdaLN residual blocks ``depth`` (0: the final AdaLN
    layer alone, v = out(LN(input(x)) * scale + shift)), modulation ``rank`` (0 = full)."""

    width: int
    depth: int
    rank: int = 0

    def __post_init__(self):
        if self.width <= 0 or self.depth < 0 or self.rank < 0:
            raise ValueError(f"CompactHeadSpec: width must be > 0, depth and rank >= 0, got {self}")

    def to_metadata(self) -> dict[str, str]:
        return {"width": str(self.width), "depth": str(self.depth), "rank": str(self.rank)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "") -> CompactHeadSpec:
        try:
            return cls(int(meta["width"]), int(meta["depth"]), int(meta["rank"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where or 'compact head'}: metadata must give integer width, depth and rank, "
                             f"got {meta}") from err


class CompactHead(nn.Module):
    """v(x_t, f) at a fixed time: the same interface as :class:`FixedTimeHead`, at its own size.

    c = SiLU(cond_proj(f)); mods = ada(c) (or ada_up(ada_down(c)) at rank r), split into (shift, scale, gate) per
    block and (shift, scale) for the final layer, with the ``1 +`` of each scale in its bias; h = input_proj(x_t);
    each block h += gate * MLP(LN(h) * scale + shift); v = out(LN(h) * scale + shift).
    """

    def __init__(self, token_dim: int, cond_dim: int, spec: CompactHeadSpec, time: float = 1.0):
        super().__init__()
        w, d, r = spec.width, spec.depth, spec.rank
        self.spec, self.token_dim, self.cond_dim, self.time = spec, token_dim, cond_dim, float(time)
        self.cond_proj = nn.Linear(cond_dim, w)
        n_mod = (3 * d + 2) * w
        if r:
            self.ada_down = nn.Linear(w, r, bias=False)
            self.ada_up = nn.Linear(r, n_mod)
        else:
            self.ada = nn.Linear(w, n_mod)
        self.input_proj = nn.Linear(token_dim, w)
        self.mlp1 = nn.ModuleList(nn.Linear(w, w) for _ in range(d))
        self.mlp2 = nn.ModuleList(nn.Linear(w, w) for _ in range(d))
        self.out = nn.Linear(w, token_dim)
        with torch.no_grad():  # a fresh head starts near the identity blocks of a fresh MLPHead: unit scales
            last = self.ada_up if r else self.ada
            last.weight.mul_(0.1)
            last.bias.zero_()
            for i in range(d + 1):
                last.bias[(3 * i + 1) * w : (3 * i + 2) * w] = 1.0

    def tensors(self) -> dict[str, Tensor]:
        """This head's parameters in the layout of :meth:`FixedTimeHead.from_tensors` (transposed views, so
        gradients reach the parameters)."""
        def t(linear: nn.Linear) -> Tensor:
            return linear.weight.T

        tensors = {"cond_w": t(self.cond_proj), "cond_b": self.cond_proj.bias, "in_w": t(self.input_proj),
                   "in_b": self.input_proj.bias, "out_w": t(self.out), "out_b": self.out.bias}
        if self.spec.rank:
            tensors.update(ada_down_w=t(self.ada_down), ada_w=t(self.ada_up), ada_b=self.ada_up.bias)
        else:
            tensors.update(ada_w=t(self.ada), ada_b=self.ada.bias)
        for i in range(self.spec.depth):
            tensors.update({f"mlp{i}_w1": t(self.mlp1[i]), f"mlp{i}_b1": self.mlp1[i].bias,
                            f"mlp{i}_w2": t(self.mlp2[i]), f"mlp{i}_b2": self.mlp2[i].bias})
        return tensors

    def forward(self, x_t: Tensor, feats: Tensor) -> Tensor:
        """Velocity (..., Ce) at tokens x_t (..., Ce) given backbone features (..., D), at ``self.time``."""
        return fixed_time_velocity(x_t, feats, self.tensors(), self.spec.width, self.spec.depth, self.token_dim,
                                   self.cond_dim, owner="CompactHead")

    @torch.no_grad()
    def folded(self) -> FixedTimeHead:
        """This head as it is sampled: a :class:`FixedTimeHead` of copies of its weights, the same function. One
        ``addmm`` per Linear on pre-transposed matrices and no module calls: at batch 1 the module form's call
        overhead was ~40% of its time (70 against 115 us for width 64, depth 1, 16 rows)."""
        return FixedTimeHead.from_tensors(self.spec.width, self.spec.depth, self.token_dim, self.cond_dim, self.time,
                                          self.tensors())

    @torch.no_grad()
    def init_from(self, full: FixedTimeHead) -> None:
        """Start from a folded full head of the same width and depth: every weight copied, the modulation truncated
        to this head's rank by SVD (exact at rank 0)."""
        if full.low_rank:
            raise ValueError("init_from: the source head's modulation is already low-rank; start from a full head")
        if (full.width, full.depth) != (self.spec.width, self.spec.depth):
            raise ValueError(f"init_from: the full head is width {full.width}, depth {full.depth}; this compact head "
                             f"is {self.spec}")
        self.cond_proj.weight.copy_(full.cond_w.T)
        self.cond_proj.bias.copy_(full.cond_b)
        if self.spec.rank:
            u, s, vh = torch.linalg.svd(full.ada_w.T.double(), full_matrices=False)  # (n_mod, w) = u s vh
            r = self.spec.rank
            self.ada_down.weight.copy_(vh[:r])
            self.ada_up.weight.copy_(u[:, :r] * s[:r])
            self.ada_up.bias.copy_(full.ada_b)
        else:
            self.ada.weight.copy_(full.ada_w.T)
            self.ada.bias.copy_(full.ada_b)
        self.input_proj.weight.copy_(full.in_w.T)
        self.input_proj.bias.copy_(full.in_b)
        for i in range(self.spec.depth):
            self.mlp1[i].weight.copy_(getattr(full, f"mlp{i}_w1").T)
            self.mlp1[i].bias.copy_(getattr(full, f"mlp{i}_b1"))
            self.mlp2[i].weight.copy_(getattr(full, f"mlp{i}_w2").T)
            self.mlp2[i].bias.copy_(getattr(full, f"mlp{i}_b2"))
        self.out.weight.copy_(full.out_w.T)
        self.out.bias.copy_(full.out_b)


def multiply_adds_per_token(token_dim: int, cond_dim: int, spec: CompactHeadSpec) -> int:
    """Multiply-adds of one token through a head of this geometry (what bounds it at large batch on a CPU)."""
    w, d, r = spec.width, spec.depth, spec.rank
    n_mod = (3 * d + 2) * w
    mod = r * (w + n_mod) if r else w * n_mod
    return cond_dim * w + mod + token_dim * w + d * 2 * w * w + w * token_dim


@torch.no_grad()
def _draw_pool(backbone, full: FixedTimeHead, sequences: int, num_tokens: int, token_dim: int,
               draw_cond: Callable[[int, torch.Generator], Cond], gen: torch.Generator, chunk: int) -> tuple:
    """(eps, feats, v) rows of ``sequences`` fresh generator inputs: the exact joint the head sees when sampling."""
    eps_rows, feat_rows, v_rows = [], [], []
    for start in range(0, sequences, chunk):
        b = min(chunk, sequences - start)
        eps = torch.randn(b, num_tokens, token_dim, generator=gen)
        feats = backbone.features(eps, draw_cond(b, gen))
        eps_rows.append(eps.reshape(-1, token_dim))
        feat_rows.append(feats.reshape(-1, feats.shape[-1]).float())
        v_rows.append(full(eps, feats).reshape(-1, token_dim).float())
    return torch.cat(eps_rows), torch.cat(feat_rows), torch.cat(v_rows)


def fit_compact_head(
    sampler,
    spec: CompactHeadSpec,
    draw_cond: Callable[[int, torch.Generator], Cond],
    steps: int = 2000,
    lr: float = 2e-3,
    batch_rows: int = 4096,
    pool_sequences: int = 4096,
    refresh_every: int = 500,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[CompactHead, dict]:
    """Regress a :class:`CompactHead` onto a generator's full head on the generator's own inputs.

    Args:
        sampler: the generator's sampling form (``StudentNet.for_sampling()``: ``backbone``, a folded ``head``,
            ``num_tokens``, ``embed_dim``); its weights are not changed.
        spec: the compact geometry; with the full head's width and depth it starts from the full head.
        draw_cond: (batch, torch.Generator) -> the conditions of fresh sequences (e.g. uniform class labels).
        steps, lr, batch_rows: Adam steps (cosine decay to 0 after a 5% warm-up), peak LR, token rows per step.
        pool_sequences, refresh_every: rows are drawn from a pool of this many fresh sequences, redrawn every
            ``refresh_every`` steps (the backbone pass dominates a draw, so the pool amortises it).
        seed: every draw (pool noise, conditions, row picks) comes from one generator seeded here.
    Returns (the fitted head in eval mode, a report: relative squared error of v on a held-out pool before and
    after fitting, steps, seconds, multiply-adds per token of both heads).
    """
    if steps < 0 or batch_rows <= 0 or pool_sequences <= 0 or refresh_every <= 0:
        raise ValueError(f"fit_compact_head: steps >= 0, batch_rows, pool_sequences and refresh_every > 0, got "
                         f"{steps}, {batch_rows}, {pool_sequences}, {refresh_every}")
    full: FixedTimeHead = sampler.head
    if not isinstance(full, FixedTimeHead):
        raise TypeError(f"fit_compact_head needs a generator whose head is a FixedTimeHead (StudentNet.for_sampling()"
                        f"), got {type(full).__name__}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # a fresh head's init is seeded too, without moving the caller's RNG
        torch.manual_seed(seed)
        head = CompactHead(full.token_dim, full.cond_dim, spec, time=full.time)
    if (spec.width, spec.depth) == (full.width, full.depth):
        head.init_from(full)
    draw = lambda n: _draw_pool(sampler.backbone, full, n, sampler.num_tokens, sampler.embed_dim,  # noqa: E731
                                draw_cond, gen, chunk=256)
    held_out = draw(max(64, pool_sequences // 8))

    @torch.no_grad()
    def rel_err() -> float:
        eps, feats, v = held_out
        pred = torch.cat([head(eps[s : s + 8192], feats[s : s + 8192]) for s in range(0, len(eps), 8192)])
        return float(((pred - v) ** 2).sum() / (v**2).sum())

    before = rel_err()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    warm = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    head.train()
    pool = None
    for step in range(steps):
        if step % refresh_every == 0:
            pool = draw(pool_sequences)
        eps, feats, v = pool
        idx = torch.randint(len(eps), (batch_rows,), generator=gen)
        loss = F.mse_loss(head(eps[idx], feats[idx]), v[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"    compact head step {step + 1}/{steps}: mse {loss.item():.3e}")
    head.eval().requires_grad_(False)
    after = rel_err()
    report = {"spec": {"width": spec.width, "depth": spec.depth, "rank": spec.rank}, "steps": steps, "lr": lr,
              "batch_rows": batch_rows, "pool_sequences": pool_sequences, "seed": seed,
              "relative_error_before": before, "relative_error_after": after,
              "multiply_adds_per_token": multiply_adds_per_token(full.token_dim, full.cond_dim, spec),
              "full_multiply_adds_per_token": multiply_adds_per_token(
                  full.token_dim, full.cond_dim, CompactHeadSpec(full.width, full.depth)),
              "seconds": time.perf_counter() - t0}
    return head, report


def save_compact_head(head: CompactHead, path, report: dict | None = None) -> None:
    """Write a fitted head as safetensors, its geometry (and token / feature sizes, time) in the file's metadata;
    ``report`` (from :func:`fit_compact_head`) goes to a ``.json`` beside it."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**head.spec.to_metadata(), "token_dim": str(head.token_dim), "cond_dim": str(head.cond_dim),
            "time": repr(head.time)}
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path), metadata=meta)
    if report is not None:
        path.with_suffix(".json").write_text(json.dumps(report, indent=2))


def load_compact_head(path) -> CompactHead:
    """A head written by :func:`save_compact_head`, in eval mode; a file that is not one is refused by name."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_compact_head: missing {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    spec = CompactHeadSpec.from_metadata(meta, where=str(path))
    try:
        token_dim, cond_dim, t = int(meta["token_dim"]), int(meta["cond_dim"]), float(meta["time"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: metadata must give token_dim, cond_dim and time, got {meta}") from err
    head = CompactHead(token_dim, cond_dim, spec, time=t)
    missing, unexpected = head.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match a compact head {spec}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return head.eval().requires_grad_(False)
