"""Training the small class-conditional AR teachers (VAR next-scale, LlamaGen raster) on tokenised digits.

Plain cross-entropy on token ids through the teacher's own teacher-forced pass (``features`` + ``head_logits``:
the shift by one AR step is built in, so row i predicts token i from earlier steps). VAR consumes the flat
multi-scale ids (scales concatenated), LlamaGen the raster ids. A fraction of conditions is replaced by the null
condition (the null class, or a text teacher's null caption) so the same network also models the unconditional
distribution that classifier-free guidance needs. Each batch's condition comes from a :data:`BatchCond`: class
labels (:func:`label_batches`) or captions (:mod:`dd2dist.digits.caption_batches`).
The tokenizer is frozen here; it was trained first (:mod:`dd2dist.digits.vq_training`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dd2dist.conditions import Cond
from dd2dist.digits.recipe import TeacherRecipe
from dd2dist.teachers.base import ARTeacher

# (indices of the batch's training images, the training generator) -> the batch's condition, condition dropout
# already applied. Drawing from the training generator keeps a run reproducible from recipe.seed alone.
BatchCond = Callable[[Tensor, torch.Generator], Cond]


def label_batches(labels: Tensor, null_label: int, drop_prob: float) -> BatchCond:
    """Class labels of each batch, each replaced by ``null_label`` with probability ``drop_prob``."""

    def batch(idx: Tensor, gen: torch.Generator) -> Cond:
        y = labels[idx].clone()
        drop = torch.rand(y.shape, generator=gen) < drop_prob
        y[drop] = null_label
        return Cond(labels=y)

    return batch


def transformer_parameters(teacher: ARTeacher) -> list[torch.nn.Parameter]:
    """Everything but the tokenizer: what AR training updates."""
    tok = {id(p) for p in teacher.tokenizer.parameters()}
    return [p for p in teacher.parameters() if id(p) not in tok]


def ar_loss(teacher: ARTeacher, ids: Tensor, cond: Cond | Tensor) -> Tensor:
    """Mean token cross-entropy of the teacher-forced pass (nats per token); ``cond`` may be bare class labels."""
    if not isinstance(cond, Cond):
        cond = Cond(labels=cond)
    logits = teacher.head_logits(teacher.features(ids, cond), cond)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def train_ar(
    teacher: ARTeacher,
    ids: Tensor,
    conds: Tensor | BatchCond,
    recipe: TeacherRecipe,
    log: Callable[[str], None] = print,
    heldout: tuple[Tensor, Tensor | Cond] | None = None,
) -> dict:
    """Train the teacher's transformer in place on ids (N, L); the tokenizer stays frozen.

    ``conds``: class labels (N,) (dropped to the null class with ``recipe.label_drop``), or a :data:`BatchCond`.
    ``heldout``: (ids, true labels or Cond) scored without dropout. Returns final train / held-out cross-entropy
    and the time taken.
    """
    if isinstance(conds, Tensor):
        conds = label_batches(conds, teacher.num_classes, recipe.label_drop)
    if ids.shape[1] != teacher.num_tokens:
        raise ValueError(f"token ids have {ids.shape[1]} tokens per image, the teacher expects {teacher.num_tokens}")
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    teacher.tokenizer.requires_grad_(False).eval()
    params = transformer_parameters(teacher)
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.ar_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.ar_lr, betas=(0.9, 0.95),
    )
    n = ids.shape[0]
    steps_per_epoch = (n + recipe.ar_batch_size - 1) // recipe.ar_batch_size
    total = max(1, recipe.ar_epochs * steps_per_epoch)
    warmup = min(100, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    teacher.train()
    teacher.tokenizer.eval()
    train_ce = float("nan")
    for epoch in range(recipe.ar_epochs):
        order = torch.randperm(n, generator=gen)
        total_ce, batches = 0.0, 0
        for i in range(0, n, recipe.ar_batch_size):
            idx = order[i : i + recipe.ar_batch_size]
            loss = ar_loss(teacher, ids[idx], conds(idx, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total_ce += loss.item()
            batches += 1
        train_ce = total_ce / max(1, batches)
        if epoch == recipe.ar_epochs - 1 or epoch % 10 == 0:
            msg = f"  AR epoch {epoch + 1}/{recipe.ar_epochs}: train CE {train_ce:.4f}"
            if heldout is not None:
                msg += f" held-out CE {heldout_ce(teacher, *heldout):.4f}"
            log(msg)
    teacher.eval()
    out = {"train_ce": train_ce, "seconds": time.perf_counter() - t0, "steps": total}
    if heldout is not None:
        out["heldout_ce"] = heldout_ce(teacher, *heldout)
    return out


@torch.no_grad()
def heldout_ce(teacher: ARTeacher, ids: Tensor, cond: Tensor | Cond, batch_size: int = 256) -> float:
    """Cross-entropy (nats / token) of held-out token sequences under their true condition, in eval mode."""
    if not isinstance(cond, Cond):
        cond = Cond(labels=cond)
    was_training = teacher.training
    teacher.eval()
    total = 0.0
    for i in range(0, ids.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        total += ar_loss(teacher, ids[rows], cond.select(rows)).item() * min(batch_size, ids.shape[0] - i)
    teacher.train(was_training)
    return total / ids.shape[0]
