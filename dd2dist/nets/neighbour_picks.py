"""A categorical generator's head that reads the codes it has just picked at earlier positions the teacher conditions
on most directly.

A one-pass generator makes token i from features of the noise of earlier positions, so to follow the teacher's chain
its backbone must rebuild every earlier token from that noise. On the digits teachers that read-back is what limits
it: in the one-pass ceiling (:mod:`dd2dist.eval.one_pass_ceiling`) the LlamaGen per-position KL grows along the
sequence and extra layers do not help (docs/method.md §12.15), and a VAR generator's likelihood gap sits at the last
scale, whose tokens depend on the codes of the scales before (docs/method.md §12.17).

:class:`NeighbourPicks` gives the head the exact codes instead, for the earlier positions that matter most:

* ``left`` / ``left_up`` (raster, LlamaGen): the token just before and the one a row above; ``left_up_prefix`` adds
  the mean embedding of every code picked before (a bag of the whole prefix's codes);
* ``parents`` (next-scale, VAR): the token at the same place in each earlier scale (its parent, grandparent, ...).

After the single backbone pass it walks the positions in **waves** whose tokens the teacher draws together (one
position per wave in a raster, one scale per wave in VAR): a position's code logits are the posterior head's on
``feats_i + MLP(feats_i + sum_j E_j[x_{src_j(i)}])``, and its code is picked from them at its own uniform before the
next wave is computed. The MLP is small (width 2D) and ends in a zero layer, so a fresh head gives the plain
categorical generator's outputs. The conditional of token i given the earlier noise stays known in closed form (the
picks it reads are functions of that noise), so the exact stage-2 KL applies unchanged.

Cost: one backbone pass, then one (B, n, D) MLP and (D, V) output layer per wave (N waves for LlamaGen, one per
scale for VAR): the output layer of a teacher-forced pass plus the MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dd2dist.nets.categorical import pick_codes

NEIGHBOUR_PICKS = ("none", "left", "left_up", "left_up_prefix", "parents")  # student.neighbour_picks
RASTER_PICKS = ("left", "left_up", "left_up_prefix")  # LlamaGen: the layout is the raster grid's side
SCALE_PICKS = ("parents",)  # VAR: the layout is the patch sizes of the scales
EMBED_STD = 0.5  # the embeddings enter through the MLP (whose output starts at zero): any nonzero scale trains


def raster_sources(grid: int, which: str) -> tuple[Tensor, list[tuple[int, int]]]:
    """(sources (N, J) int64, -1 = none; waves): position i reads i - 1 (``left``) and i - grid (``left_up``), one
    position per wave. The left neighbour of a row's first token is the last token of the row above."""
    n = grid * grid
    offsets = (1,) if which == "left" else (1, grid)
    # on the CPU whatever device the module is built under (a meta-device build still needs the tables)
    sources = torch.arange(n, device="cpu")[:, None] - torch.tensor(offsets, device="cpu")[None]
    return sources.clamp(min=-1), [(k, k + 1) for k in range(n)]


def scale_sources(patch_nums: tuple[int, ...]) -> tuple[Tensor, list[tuple[int, int]]]:
    """(sources (N, S - 1) int64, -1 = none; waves): the token at row r, column c of scale k (side p_k) reads, for
    j = 1 .. S - 1, the token of scale k - j at row r * p_{k-j} // p_k, column c * p_{k-j} // p_k (the place it
    covers); one scale per wave."""
    starts = [0]
    for p in patch_nums:
        starts.append(starts[-1] + p * p)
    rows = []
    for k, p in enumerate(patch_nums):
        for r in range(p):
            for c in range(p):
                row = []
                for j in range(1, len(patch_nums)):
                    m = k - j
                    q = patch_nums[m] if m >= 0 else 0
                    row.append(starts[m] + (r * q // p) * q + (c * q // p) if m >= 0 else -1)
                rows.append(row)
    return (torch.tensor(rows, dtype=torch.long, device="cpu"),
            [(starts[k], starts[k + 1]) for k in range(len(patch_nums))])


class NeighbourPicks(nn.Module):
    """The wave-by-wave loop of a categorical generator that reads its own picks at earlier positions.

    Args:
        vocab_size: V codes; the embeddings have one more row for "no such position" (the first token, the first
            row, the first scales).
        model_dim: D, the backbone's feature width.
        layout: the raster grid's side (``left``, ``left_up``) or the scales' patch sizes (``parents``).
        which: a name of :data:`NEIGHBOUR_PICKS` other than ``none``.
    """

    def __init__(self, vocab_size: int, model_dim: int, layout: int | tuple[int, ...], which: str):
        super().__init__()
        if which in RASTER_PICKS and isinstance(layout, int):
            sources, waves = raster_sources(layout, which)
        elif which in SCALE_PICKS and not isinstance(layout, int):
            sources, waves = scale_sources(tuple(layout))
        else:
            raise ValueError(f"student.neighbour_picks must be one of {RASTER_PICKS} for a raster grid or "
                             f"{SCALE_PICKS} for scales, got {which!r} with layout {layout!r}")
        self.vocab_size, self.layout, self.which = vocab_size, layout, which
        # plain lists: the loop reads them per wave; the module's state dict holds only what trains
        self.waves = waves
        self.one_per_wave = all(b - a == 1 for a, b in waves)
        self.sources = [sources[a:b].T.tolist() for a, b in waves]  # per wave, per table: source index per position
        self.embed = nn.ModuleList(nn.Embedding(vocab_size + 1, model_dim) for _ in range(sources.shape[1]))
        # the whole prefix as the mean of its codes' embeddings (row V: the empty prefix of the first position)
        self.prefix = nn.Embedding(vocab_size + 1, model_dim) if which.endswith("_prefix") else None
        for table in (*self.embed, *([self.prefix] if self.prefix is not None else [])):
            nn.init.normal_(table.weight, std=EMBED_STD)
        self.mlp = nn.Sequential(nn.Linear(model_dim, 2 * model_dim), nn.GELU(), nn.Linear(2 * model_dim, model_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def _read(self, picks: list[Tensor], done: Tensor | None, sources: list[int], none: Tensor) -> Tensor:
        """(B, n) the codes at ``sources`` among the picks so far, the "none" row (``none``, (B, n)) where a source is
        -1. ``picks`` holds one (B, n_w) tensor per finished wave; ``done`` is their concatenation (B, M), None in a
        raster, where the wave of position s is picks[s] and no gather is needed."""
        if max(sources) < 0:
            return none
        if done is None:
            return picks[sources[0]]
        src = torch.tensor(sources, device=done.device)
        return done[:, src.clamp(min=0)].where(src >= 0, none)

    def forward(self, feats: Tensor, eps: Tensor, code_log_probs, order: Tensor | None) -> tuple[Tensor, Tensor]:
        """Code log-probs (B, N, V), fp32, of backbone features ``feats`` (B, N, D) with each position reading the
        codes picked at its sources in earlier waves, and those picks (B, N): :func:`pick_codes` of the log-probs at
        the uniforms of ``eps``. ``code_log_probs(feats)`` is the posterior head's log-softmax and ``order`` the
        CDF's code order."""
        B = feats.shape[0]
        picks: list[Tensor] = []  # new tensors per wave, not one written in place: autograd keeps what it embedded
        rows: list[Tensor] = []
        nones: dict[int, Tensor] = {}  # the "none" codes (B, n) per wave size
        prefix_sum: Tensor | None = None  # (B, 1, D): the prefix table's embeddings of every pick so far, summed
        for (a, b), sources in zip(self.waves, self.sources):
            if b - a not in nones:
                nones[b - a] = torch.full((B, b - a), self.vocab_size, dtype=torch.long, device=feats.device)
            none = nones[b - a]
            mixed = feats[:, a:b]
            done = torch.cat(picks, 1) if picks and not self.one_per_wave else None  # once per wave, for every table
            for table, src in zip(self.embed, sources):
                mixed = mixed + table(self._read(picks, done, src, none))
            if self.prefix is not None:
                mixed = mixed + (self.prefix(none[:, :1]) if prefix_sum is None else prefix_sum / a)
            log_probs = code_log_probs(feats[:, a:b] + self.mlp(mixed).to(feats.dtype))
            picks.append(pick_codes(log_probs, eps[:, a:b], order))
            rows.append(log_probs)
            if self.prefix is not None:
                added = self.prefix(picks[-1]).sum(1, keepdim=True)
                prefix_sum = added if prefix_sum is None else prefix_sum + added
        return torch.cat(rows, 1), torch.cat(picks, 1)
