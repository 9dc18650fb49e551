"""The student network: a trainable copy of the teacher backbone plus the MLP head (one class, two roles).

* guidance ψ (and the stage-1 AR-diffusion model): ``features(q, cond)`` teacher-forced on a clean (detached)
  sequence, then ``velocity(x_t, t, feats)`` per position;
* generator θ: ``generate(eps, cond)`` feeds the noise itself to the backbone — the teacher's ``features`` has the
  one-AR-step shift built in, so row i sees only the noise of earlier AR steps — and the head maps each
  position's own noise to ``q_i = eps_i - v(eps_i, t=generator_time, f_i)``: one Euler step from t=1 to 0, the
  whole sequence in one pass (method.md §3, §4.3).

VAR variant of "shift by one scale" (method.md §4.3 [I/PROP]): the noise of scales < k is treated as code vectors in
VAR's own next-scale input construction (accumulate f_hat through the φ convs, area-downsample, ``word_embed``);
that is exactly ``VARTeacher.features`` on the noise sequence. We chose it over DD1's extra 1x1 level because it
reuses the teacher's input path unchanged and keeps the same causal dependency.

What is dropped from the copied teacher: the classifier head (VAR ``head``/``head_nm``, LlamaGen ``output``), the
tokenizer's encoder/decoder and quant convs, and LlamaGen's ``tok_embeddings`` (the student's inputs are
continuous, see below). What stays frozen: the parts of the tokenizer that define the latent space (the codebook
and VAR's φ convs) become buffers, so they are saved with the student but never trained, and every *parameter*
of a StudentNet is trainable (``Engine.assert_mode`` checks all of them together).

LlamaGen: the student's inputs are continuous (generator noise, the generator's continuous outputs), so it always
uses the ``mlp`` input adapter. When the teacher already uses ``mlp`` (a stage-0 adapted teacher) it is copied;
otherwise a fresh ``input_mlp`` is initialised by regressing it onto the teacher's ``tok_embeddings`` over all
normalised codes (``dd2dist.teachers.adapt.regress_input_mlp``), so the student starts equal to the teacher on
code vectors.
"""

from __future__ import annotations

import copy
import logging

from torch import Tensor, nn

from dd2dist.nets.head import MLPHead
from dd2dist.teachers.base import ARTeacher, Cond

log = logging.getLogger("dd2dist.nets")


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


def _llamagen_mlp_backbone(teacher: ARTeacher, regress_steps: int, regress_lr: float) -> ARTeacher:
    """A LlamaGen copy with the ``mlp`` input adapter (see the module docstring)."""
    if teacher.cfg.input_adapter == "mlp":
        return copy.deepcopy(teacher)
    from dd2dist.teachers.adapt import regress_input_mlp, with_mlp_adapter

    backbone = with_mlp_adapter(teacher)
    backbone.requires_grad_(True)
    if regress_steps > 0:  # 0: weights are about to be loaded from a checkpoint anyway
        rel_err = regress_input_mlp(backbone, steps=regress_steps, lr=regress_lr)
        log.info("student: LlamaGen input_mlp regressed onto tok_embeddings, relative error %.3g", rel_err)
    return backbone


def student_backbone(teacher: ARTeacher, regress_steps: int = 200, regress_lr: float = 1e-3) -> ARTeacher:
    """A pruned, trainable copy of the teacher that still implements ``features`` (see the module docstring)."""
    if teacher.family == "var":
        backbone = copy.deepcopy(teacher)
        _drop(backbone.transformer, "head", "head_nm")
    elif teacher.family == "llamagen":
        backbone = _llamagen_mlp_backbone(teacher, regress_steps, regress_lr)
        _drop(backbone.gpt, "output", "tok_embeddings")
    else:
        raise ValueError(f"unknown teacher family {teacher.family!r}")
    _drop(backbone.tokenizer, "encoder", "decoder", "quant_conv", "post_quant_conv")
    params_to_buffers(backbone.tokenizer)
    backbone.train()
    backbone.requires_grad_(True)
    return backbone


class StudentNet(nn.Module):
    """Teacher backbone + MLP head, velocity-predicting; the guidance network and the generator share it.

    Args:
        teacher: the (unpartitioned) teacher to copy; it is not modified.
        student_cfg: a :class:`dd2dist.config.schema.StudentConfig` (head_width, head_depth, time_embed_dim,
            generator_time, and the LlamaGen adapter-regression settings when present).
        init_adapter: False skips the LlamaGen input-MLP regression (when weights are loaded right after).
    """

    def __init__(self, teacher: ARTeacher, student_cfg, init_adapter: bool = True):
        super().__init__()
        self.backbone = student_backbone(
            teacher,
            regress_steps=student_cfg.adapter_regress_steps if init_adapter else 0,
            regress_lr=student_cfg.adapter_regress_lr,
        )
        self.head = MLPHead(
            token_dim=teacher.embed_dim,
            cond_dim=teacher.hidden_dim,
            width=student_cfg.head_width,
            depth=student_cfg.head_depth,
            time_embed_dim=student_cfg.time_embed_dim,
        ).to(next(self.backbone.parameters()).device)
        self.generator_time = float(student_cfg.generator_time)
        self.num_tokens, self.embed_dim = teacher.num_tokens, teacher.embed_dim

    def features(self, seq: Tensor, cond: Cond) -> Tensor:
        """Backbone features (B, N, D) of a sequence (B, N, Ce); row i depends on earlier AR steps only."""
        return self.backbone.features(seq, cond)

    def velocity(self, x_t: Tensor, t: Tensor | float, feats: Tensor) -> Tensor:
        """Head velocity (B, N, Ce) at noisy tokens x_t and times t (B, N) given :meth:`features`."""
        return self.head(x_t, t, feats)

    def generate(self, eps: Tensor, cond: Cond) -> Tensor:
        """Generator role: noise (B, N, Ce) -> continuous tokens q = eps - v(eps, generator_time, features(eps))."""
        if eps.dim() != 3 or eps.shape[1:] != (self.num_tokens, self.embed_dim):
            raise ValueError(f"eps must be (B, {self.num_tokens}, {self.embed_dim}), got {tuple(eps.shape)}")
        feats = self.features(eps, cond)
        return eps - self.velocity(eps, self.generator_time, feats).to(eps.dtype)

    def forward(self, eps: Tensor, cond: Cond) -> Tensor:
        """Same as :meth:`generate` (the generator is what gets exported and sampled)."""
        return self.generate(eps, cond)
