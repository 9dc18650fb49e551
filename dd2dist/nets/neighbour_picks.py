"""A categorical LlamaGen generator's head that reads the codes it has just picked at each position's neighbours.

A one-pass generator makes token i from features of the noise of earlier positions, so to follow the teacher's raster
chain its backbone must rebuild every earlier token from that noise. On the LlamaGen digits teacher that read-back is
what limits it: in the one-pass ceiling (:mod:`dd2dist.eval.one_pass_ceiling`) the per-position KL grows along the
sequence and extra layers do not help (docs/method.md §12.15).

:class:`NeighbourPicks` gives the head the exact codes instead, for the neighbours that matter most in a raster: the
token just before (``left``) and the one a row above (``up``). After the single backbone pass it walks the positions
once: position i's code logits are the posterior head's on ``feats_i + MLP(feats_i + E_left[x_{i-1}] +
E_up[x_{i-grid}])``, and its code is picked from them at its own uniform before position i + 1 is computed. The MLP
is small (width 2D on one row per step) and ends in a zero layer, so a fresh head gives the plain categorical
generator's outputs. The conditional of token i given the earlier noise stays known in closed form (the picks it
reads are functions of that noise), so the exact stage-2 KL applies unchanged.

Cost: one backbone pass, then N steps of an (B, D) MLP and the (D, V) output layer, the same work as the output layer
of a teacher-forced pass plus the MLP, in N small sequential steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dd2dist.nets.categorical import pick_codes

NEIGHBOUR_PICKS = ("none", "left", "left_up")  # student.neighbour_picks
EMBED_STD = 0.5  # the embeddings enter through the MLP (whose output starts at zero): any nonzero scale trains


class NeighbourPicks(nn.Module):
    """The per-position loop of a categorical generator that reads its own picks at the left / upper neighbours.

    Args:
        vocab_size: V codes; the embeddings have one more row for "no neighbour" (first position, first row).
        model_dim: D, the backbone's feature width.
        grid: tokens per raster row (the upper neighbour of position i is i - grid).
        which: ``left`` or ``left_up``.
    """

    def __init__(self, vocab_size: int, model_dim: int, grid: int, which: str):
        super().__init__()
        if which not in NEIGHBOUR_PICKS or which == "none":
            raise ValueError(f"student.neighbour_picks must be one of {NEIGHBOUR_PICKS[1:]}, got {which!r}")
        self.vocab_size, self.grid, self.which = vocab_size, grid, which
        self.offsets = (1,) if which == "left" else (1, grid)
        self.embed = nn.ModuleList(nn.Embedding(vocab_size + 1, model_dim) for _ in self.offsets)
        for table in self.embed:
            nn.init.normal_(table.weight, std=EMBED_STD)
        self.mlp = nn.Sequential(nn.Linear(model_dim, 2 * model_dim), nn.GELU(), nn.Linear(2 * model_dim, model_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, feats: Tensor, eps: Tensor, code_log_probs, order: Tensor | None) -> tuple[Tensor, Tensor]:
        """Code log-probs (B, N, V), fp32, of backbone features ``feats`` (B, N, D) with each position reading the
        codes picked before it at its neighbours, and those picks (B, N): :func:`pick_codes` of the log-probs at the
        uniforms of ``eps``. ``code_log_probs(feats_row)`` is the posterior head's log-softmax and ``order`` the
        CDF's code order."""
        B, N, _ = feats.shape
        none = torch.full((B,), self.vocab_size, dtype=torch.long, device=feats.device)
        picks: list[Tensor] = []  # a list, not a tensor written in place: autograd keeps the indices it embedded
        rows: list[Tensor] = []
        for i in range(N):
            mixed = feats[:, i]
            for offset, table in zip(self.offsets, self.embed):
                mixed = mixed + table(picks[i - offset] if i >= offset else none)
            log_probs = code_log_probs(feats[:, i] + self.mlp(mixed).to(feats.dtype))
            picks.append(pick_codes(log_probs[:, None], eps[:, i : i + 1], order)[:, 0])
            rows.append(log_probs)
        return torch.stack(rows, 1), torch.stack(picks, 1)
