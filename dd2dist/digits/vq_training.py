"""Training the real tokenizer classes (VAR's multi-scale VQVAE, LlamaGen's VQ-16) at small sizes on digits.

The VQ objective lives here, not in the tokenizer modules (which stay inference-only, as released):
reconstruction MSE on the decoder output, the codebook term ||sg(z) - q||^2, the commitment term
beta ||z - sg(q)||^2, and the straight-through estimator q_st = z + sg(q - z) so reconstruction gradients reach
the encoder. VAR quantises residually over scales (``f_to_ids`` gives the accumulated f_hat, differentiable in
the codebook and the phi convs); VQ-16 quantises L2-normalised vectors against the normalised codebook.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.digits.recipe import TeacherRecipe
from dd2dist.teachers.var_vqvae import VARVQVAE
from dd2dist.teachers.vq16 import VQ16


def var_vq_step(tok: VARVQVAE, x: Tensor, beta: float) -> tuple[Tensor, dict[str, float], Tensor, Tensor]:
    """One VAR VQVAE forward: (loss, parts, ids of the last scale (B, h, w), encoder map f)."""
    f = tok.quant_conv(tok.encoder(x))
    ids_per_scale, f_hat = tok.quantize.f_to_ids(f)
    codebook_loss = F.mse_loss(f_hat, f.detach())
    commit_loss = F.mse_loss(f, f_hat.detach())
    f_st = f + (f_hat - f).detach()
    rec = tok.decoder(tok.post_quant_conv(f_st))
    rec_loss = F.mse_loss(rec, x)
    loss = rec_loss + codebook_loss + beta * commit_loss
    ids = torch.cat([m.flatten(1) for m in ids_per_scale], 1)
    parts = {"rec": rec_loss.item(), "codebook": codebook_loss.item(), "commit": commit_loss.item()}
    return loss, parts, ids, f


def vq16_step(tok: VQ16, x: Tensor, beta: float) -> tuple[Tensor, dict[str, float], Tensor, Tensor]:
    """One VQ-16 forward on unit vectors: (loss, parts, ids (B, N), normalised encoder vectors (B, N, Ce))."""
    z = tok.quant_conv(tok.encoder(x))  # (B, Ce, h, w)
    B, Ce, h, w = z.shape
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(B, h * w, Ce), dim=-1)
    codebook = F.normalize(tok.quantize.embedding.weight, dim=-1)
    ids = (zn.detach() @ codebook.detach().T).argmax(-1)
    q = codebook[ids]
    codebook_loss = F.mse_loss(q, zn.detach())
    commit_loss = F.mse_loss(zn, q.detach())
    q_st = zn + (q - zn).detach()
    rec = tok.decoder(tok.post_quant_conv(q_st.transpose(1, 2).reshape(B, Ce, h, w)))
    rec_loss = F.mse_loss(rec, x)
    loss = rec_loss + codebook_loss + beta * commit_loss
    parts = {"rec": rec_loss.item(), "codebook": codebook_loss.item(), "commit": commit_loss.item()}
    return loss, parts, ids, zn


@torch.no_grad()
def _restart_dead_codes(embedding: nn.Embedding, used: Tensor, pool: Tensor, gen: torch.Generator) -> int:
    """Re-seed codes no batch picked this epoch with random encoder vectors (a dead code never gets a gradient)."""
    dead = torch.nonzero(used == 0).flatten()
    if dead.numel() == 0 or pool.shape[0] == 0:
        return 0
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=gen)
    embedding.weight[dead] = pool[pick].to(embedding.weight.dtype)
    return int(dead.numel())


def train_tokenizer(
    tok: VARVQVAE | VQ16,
    images: Tensor,
    recipe: TeacherRecipe,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``tok`` in place on images (N, 3, H, W) in [-1, 1]; returns a summary (losses, code usage, time)."""
    step = var_vq_step if isinstance(tok, VARVQVAE) else vq16_step
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    vocab = tok.quantize.embedding.num_embeddings
    opt = torch.optim.Adam(tok.parameters(), lr=recipe.vq_lr, betas=(0.5, 0.9))
    n = images.shape[0]
    total_steps = max(1, recipe.vq_epochs * ((n + recipe.vq_batch_size - 1) // recipe.vq_batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps, eta_min=recipe.vq_lr * 0.05)
    t0 = time.perf_counter()
    tok.train()
    parts: dict[str, float] = {}
    restarted = 0
    for epoch in range(recipe.vq_epochs):
        used = torch.zeros(vocab, dtype=torch.long)
        pool = []
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=gen)
        batches = 0
        for i in range(0, n, recipe.vq_batch_size):
            x = images[order[i : i + recipe.vq_batch_size]]
            loss, parts, ids, enc = step(tok, x, recipe.commitment_beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            used += torch.bincount(ids.flatten(), minlength=vocab)
            # candidate vectors for dead codes, in the codebook's own space (raw f for VAR, unit z for VQ-16)
            if enc.dim() == 4:  # VAR: (B, C, h, w) encoder map
                vecs = enc.detach().permute(0, 2, 3, 1).reshape(-1, enc.shape[1])
            else:  # VQ-16: (B, N, Ce) unit vectors
                vecs = enc.detach().reshape(-1, enc.shape[-1])
            pool.append(vecs[torch.randint(0, vecs.shape[0], (64,), generator=gen)])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        parts = {k: v / batches for k, v in sums.items()}
        if recipe.dead_code_restart and epoch < recipe.vq_epochs - 1:
            restarted += _restart_dead_codes(tok.quantize.embedding, used, torch.cat(pool), gen)
        if epoch == recipe.vq_epochs - 1 or epoch % 10 == 0:
            log(f"  tokenizer epoch {epoch + 1}/{recipe.vq_epochs}: "
                + " ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f" codes used {int((used > 0).sum())}/{vocab}")
    tok.eval()
    return {"final_losses": parts, "codes_restarted": restarted, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def reconstruction_mse(tok: VARVQVAE | VQ16, images: Tensor, batch_size: int = 256) -> float:
    """Mean squared error of encode -> decode through the module's own inference path (ids, then codes)."""
    errs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        if isinstance(tok, VARVQVAE):
            rec = tok.decode_ids(tok.img_to_flat_ids(x))
        else:
            rec = tok.decode_ids(tok.encode_ids(x)).clamp(-1, 1)
        errs.append(F.mse_loss(rec, x, reduction="sum").item())
    return sum(errs) / images.numel()
