"""The teacher interface every part of dd2dist talks to.

A teacher is a frozen, class- (or text-) conditional AR image model plus its VQ codebook. DD2 works in the
codebook-embedding space, so the interface speaks in code vectors (B, N, Ce) as well as ids (B, N): one flat
token layout for both families (VAR's scales concatenated in order, row-major inside a scale).

Concrete families implement the abstract methods (``dd2dist/teachers/var.py``, ``llamagen.py``). The student
networks reuse a teacher's backbone through :meth:`ARTeacher.features`.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
from torch import Tensor, nn

from dd2dist.conditions import Cond, Sampling, TokenPicker
from dd2dist.latent import guidance_weights, nearest_code, process_logits

Family = Literal["var", "llamagen"]


class ARTeacher(nn.Module, abc.ABC):
    """Frozen AR teacher + codebook. Subclasses set the attributes below in ``__init__``.

    Attributes:
        family: "var" or "llamagen".
        vocab_size: V.   embed_dim: Ce (codebook dim).   num_tokens: N.   num_classes: null label index.
        hidden_dim: D, the width of :meth:`features`.
        steps: list of ``slice`` into the N tokens, one per AR step (VAR: scales; LlamaGen: singletons).
        step_of_token: LongTensor[N] buffer, the AR step of each token.
        default_sampling: the family's distillation-target :class:`Sampling`.
        sample_returns_log_probs: :meth:`sample` takes ``return_log_probs=True`` and then also returns the
            (B, N, V) log-probs each token was drawn from.
    """

    family: Family
    vocab_size: int
    embed_dim: int
    num_tokens: int
    num_classes: int
    hidden_dim: int
    steps: list[slice]
    default_sampling: Sampling
    sample_returns_log_probs: bool = False

    # ---- codebook space -------------------------------------------------------------------------------
    @abc.abstractmethod
    def codebook(self) -> Tensor:
        """(V, Ce) fp32 code vectors: the DD2 latent space (VAR raw, LlamaGen L2-normalised)."""

    def embed(self, ids: Tensor) -> Tensor:
        """ids (B, N) -> code vectors (B, N, Ce)."""
        return self.codebook()[ids]

    def quantize(self, x: Tensor) -> Tensor:
        """Nearest code per token, (B, N, Ce) -> ids (B, N), by the family's metric."""
        return nearest_code(x, self.codebook(), normalized=self.family == "llamagen")

    # ---- conditioning ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def null_cond(self, batch_size: int, like: Cond | None = None) -> Cond:
        """The CFG null condition for a batch (text models copy ``like``'s mask)."""

    # ---- teacher-forced passes ------------------------------------------------------------------------
    @abc.abstractmethod
    def features(self, x: Tensor, cond: Cond) -> Tensor:
        """Teacher-forced backbone features (B, N, D); x is ids (B, N) or vectors (B, N, Ce).

        Row i depends only on tokens of AR steps earlier than ``step_of_token[i]`` (and on cond): the
        input shift by one AR step is built in, so a student feeding noise here gets the generator's
        "shifted noise" input and one feeding a clean sequence gets the guidance network's input.
        """

    @abc.abstractmethod
    def head_logits(self, feats: Tensor, cond: Cond) -> Tensor:
        """Classifier head on :meth:`features`: (B, N, D) -> raw logits (B, N, V), fp32."""

    def log_probs(self, x: Tensor, cond: Cond, sampling: Sampling | None = None) -> Tensor:
        """Teacher-forced log-probs (B, N, V), fp32, in one pass (2B rows when CFG is on).

        ``sampling=None`` gives the model's raw conditional distribution (no CFG, no filtering); otherwise
        the teacher's own CFG rule, temperature, top-k and top-p are applied (filtered codes are -inf).
        """
        if sampling is None:
            return torch.log_softmax(self.head_logits(self.features(x, cond), cond).float(), dim=-1)
        w = guidance_weights(sampling, self.step_of_token, len(self.steps))  # (N,)
        B = x.shape[0]
        if bool((w != 1).any()):
            both = Cond.cat([cond, self.null_cond(B, like=cond)])
            logits = self.head_logits(self.features(torch.cat([x, x], 0), both), both).float()
            cond_logits, uncond_logits = logits[:B], logits[B:]
        else:
            cond_logits = self.head_logits(self.features(x, cond), cond).float()
            uncond_logits = None
        return process_logits(cond_logits, uncond_logits, w, sampling)

    # ---- sampling and pixels --------------------------------------------------------------------------
    @torch.no_grad()
    @abc.abstractmethod
    def sample(self, cond: Cond, sampling: Sampling | None = None, generator: torch.Generator | None = None,
               pick: TokenPicker | None = None) -> Tensor:
        """KV-cached reference AR sampler -> ids (B, N); ``pick`` replaces the multinomial draw per AR step."""

    @abc.abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """ids (B, N) or vectors (B, N, Ce) -> images (B, 3, H, W) in [-1, 1] (needs a tokenizer)."""

    @abc.abstractmethod
    def encode(self, img: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, N) (needs a tokenizer)."""

    # ---- helpers --------------------------------------------------------------------------------------
    def freeze(self) -> ARTeacher:
        """Eval mode, no parameter requires grad: the teacher is never trained by DD2."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
