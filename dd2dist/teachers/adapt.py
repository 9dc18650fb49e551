"""Stage 0 for LlamaGen (docs/method.md §6): make the teacher accept continuous 8-d token inputs.

1. :func:`with_mlp_adapter` swaps the input lookup table for a fresh ``input_mlp`` (R^Ce -> R^D);
   :func:`regress_input_mlp` fits it onto ``tok_embeddings`` over all normalised codes.
2. :func:`finetune_ar` fine-tunes the whole GPT (adapter included) with LlamaGen's ordinary teacher-forced AR
   cross-entropy, with the usual condition dropout so the CFG null path keeps being trained.

These are plain-torch utilities; the distributed job wiring lives elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.conditions import Cond
from dd2dist.teachers.llamagen import LlamaGenTeacher


def with_mlp_adapter(teacher: LlamaGenTeacher, hidden: int = 0) -> LlamaGenTeacher:
    """A copy of ``teacher`` (same weights, device, dtype, requires_grad flags and mode) whose inputs go through a
    new, untrained ``input_mlp``.

    ``hidden`` is the adapter width (0: keep ``cfg.adapter_hidden``, whose 0 means the model width).
    """
    cfg = replace(teacher.cfg, input_adapter="mlp", adapter_hidden=hidden or teacher.cfg.adapter_hidden)
    ref = teacher.gpt.output.weight
    adapted = LlamaGenTeacher(cfg).to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = adapted.load_state_dict(teacher.state_dict(), strict=False)
    stray = [k for k in missing if not k.startswith("gpt.input_mlp.")]
    if stray or unexpected:
        raise ValueError(f"teacher state does not fit the mlp-adapter model: missing {stray}, unexpected {unexpected}")
    # same trainability as the source (a frozen teacher gives a frozen copy; the adapter follows suit)
    src = dict(teacher.named_parameters())
    any_trainable = any(p.requires_grad for p in src.values())
    for name, p in adapted.named_parameters():
        p.requires_grad_(src[name].requires_grad if name in src else any_trainable)
    return adapted.train(teacher.training)


@contextlib.contextmanager
def _trainable(params: list[nn.Parameter]):
    """Temporarily set requires_grad on ``params`` (the teacher is normally frozen), restoring the flags after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _require_mlp(teacher: LlamaGenTeacher) -> nn.Sequential:
    if teacher.cfg.input_adapter != "mlp" or not hasattr(teacher.gpt, "input_mlp"):
        raise ValueError("teacher has no input_mlp: build it with input_adapter='mlp' (see with_mlp_adapter)")
    return teacher.gpt.input_mlp


def input_mlp_relative_error(teacher: LlamaGenTeacher) -> float:
    """||mlp(C) - E||_F / ||E||_F over all normalised codes C and their ``tok_embeddings`` rows E."""
    mlp = _require_mlp(teacher)
    with torch.no_grad():
        target = teacher.gpt.tok_embeddings.weight.float()
        pred = mlp(teacher.codebook().to(mlp[0].weight.dtype)).float()
        return ((pred - target).norm() / target.norm().clamp_min(1e-12)).item()


@torch.no_grad()
def _solve_output_layer(mlp: nn.Sequential, codes: Tensor, target: Tensor) -> None:
    """Set the last Linear to the exact least-squares fit on the current hidden features (fp64 solve)."""
    hidden = mlp[:-1](codes.to(mlp[0].weight.dtype)).double()
    design = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)
    sol = torch.linalg.lstsq(design.cpu(), target.double().cpu()).solution  # (H+1, D); CPU: gelsy works everywhere
    last: nn.Linear = mlp[-1]
    last.weight.copy_(sol[:-1].T.to(last.weight))
    last.bias.copy_(sol[-1].to(last.bias))


def regress_input_mlp(
    teacher: LlamaGenTeacher,
    steps: int,
    lr: float,
    batch_size: int = 0,
    solve_output_layer: bool = True,
    generator: torch.Generator | None = None,
) -> float:
    """Fit ``input_mlp(c_i) ≈ tok_embeddings[i]`` over all V normalised codes; returns the final relative error.

    Adam on the mean squared error for ``steps`` steps (``batch_size`` codes per step, 0 = all), then (by default)
    the last layer is replaced by its exact least-squares solution on the learned hidden features, which is the
    optimum of the same objective for that layer. Only ``input_mlp`` changes.
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"regress_input_mlp needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    mlp = _require_mlp(teacher)
    codes = teacher.codebook().detach()
    target = teacher.gpt.tok_embeddings.weight.detach().float()
    V = codes.shape[0]
    params = list(mlp.parameters())
    with _trainable(params):
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            if 0 < batch_size < V:
                idx = torch.randperm(V, generator=generator)[:batch_size].to(codes.device)
                x, y = codes[idx], target[idx]
            else:
                x, y = codes, target
            loss = F.mse_loss(mlp(x.to(mlp[0].weight.dtype)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if solve_output_layer:
        _solve_output_layer(mlp, codes, target)
    return input_mlp_relative_error(teacher)


def drop_conditions(teacher: LlamaGenTeacher, cond: Cond, prob: float, generator: torch.Generator | None) -> Cond:
    """Replace each row's condition by the null condition with probability ``prob`` (LlamaGen's CFG training)."""
    if prob <= 0:
        return cond
    B = cond.batch_size
    null = teacher.null_cond(B, like=cond)
    device = (cond.labels if cond.labels is not None else cond.text).device
    drop = (torch.rand(B, generator=generator) < prob).to(device)
    if cond.labels is not None:
        return Cond(labels=torch.where(drop, null.labels.to(device), cond.labels))
    text = torch.where(drop[:, None, None], null.text.to(cond.text), cond.text)
    return Cond(text=text, text_mask=cond.text_mask)


def _batches(token_batches: Iterable[tuple[Tensor, Cond]], steps: int) -> Iterator[tuple[Tensor, Cond]]:
    """``steps`` batches, restarting a re-iterable source (a list, a DataLoader) when it runs out."""
    it = iter(token_batches)
    for step in range(steps):
        try:
            yield next(it)
        except StopIteration:
            it = iter(token_batches)
            try:
                yield next(it)
            except StopIteration:
                raise ValueError(f"token_batches ran out after {step} of {steps} fine-tuning steps") from None


def finetune_ar(
    teacher: LlamaGenTeacher,
    token_batches: Iterable[tuple[Tensor, Cond]],
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    cond_drop_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Teacher-forced AR cross-entropy fine-tuning of the whole GPT; returns the per-step loss curve.

    ``token_batches`` yields ``(ids (B, N), Cond)``; the ids enter through the teacher's input adapter (with
    ``mlp``, as their normalised code vectors), and logits of row i are scored against ids[:, i]. Conditions are
    dropped to the null condition with ``cond_drop_prob`` (0.1 as in LlamaGen training) so CFG keeps working.
    The tokenizer is not trained; parameters that get no gradient (``tok_embeddings`` under ``mlp``) are left out.
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"finetune_ar needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    gpt = teacher.gpt
    params = [p for n, p in gpt.named_parameters() if not (teacher.cfg.input_adapter == "mlp" and n.startswith("tok_"))]
    device = gpt.output.weight.device
    losses: list[float] = []
    with _trainable(params):
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        for ids, cond in _batches(token_batches, steps):
            ids, cond = ids.to(device), cond.to(device)
            cond = drop_conditions(teacher, cond, cond_drop_prob, generator)
            logits = teacher.head_logits(teacher.features(ids, cond))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(loss.item())
    return losses
