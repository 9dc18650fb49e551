"""A continuous input path for students: what the soft input rule (LlamaGen) or the linear next-scale input (VAR)
cannot pass on.

A LlamaGen student without a stage-0 ``mlp`` adapter reads every input vector through the teacher's soft rule,
``softmax(x·Cᵀ/τ) @ tok_embeddings`` at a sharp τ. On the generator's N(0, I) noise that weight vector is one-hot
almost everywhere, so the backbone learns *which code cell* each earlier noise vector fell in and nothing else. But
the token the generator made at an earlier position is a function of that noise vector itself (and of its own
prefix), so later positions cannot tell which token came before them beyond its cell, which caps the dependence
between tokens the generator can express.

:class:`VectorInput` adds a per-token MLP of the raw input vector to the embedding the soft rule gives. Its output
layer starts at zero, so a fresh student computes exactly what the teacher does (the stage-1 start and every test
that compares the two are unchanged), and training decides how much of the continuous input to use.

VAR students (``VARTeacher._parent_inputs``) apply it to every vector of scale k and add the result to the input
embeddings of the scale-(k + 1) tokens above it: VAR's own input path already carries the noise, but only linearly.
There it measured no change (docs/method.md §12.8).
"""

from __future__ import annotations

from torch import Tensor, nn

NOISE_INPUTS = ("none", "mlp")  # student.noise_input


class VectorInput(nn.Module):
    """(..., Ce) input vectors -> (..., D) additions to the token embedding: Linear, GELU, zero-initialised Linear."""

    def __init__(self, token_dim: int, model_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or model_dim
        self.net = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, model_dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(self.net[0].weight.dtype))
