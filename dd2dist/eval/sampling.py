"""Sampling from a distilled generator (docs/method.md §11), and loading an exported one without DeepSpeed.

* :func:`one_step`: q = G(eps, y), one forward pass; continuous tokens (decoded as is, docs/method.md §11.3) and
  their nearest codes (the snapping ablation).
* :func:`teacher_refined`: DD2's Alg.4: generate once, then the teacher re-samples the last k-1 AR steps one by
  one, each conditioned on everything before it (for VAR a step is a whole scale), for k steps in total.
* :func:`ar_diffusion_ids`: the stage-1 model (the guidance network's start) as an AR-diffusion sampler.
* :func:`load_generator`: ``generator.safetensors`` + ``config.yaml`` written by ``Trainer.export_generator``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dd2dist.conditions import Cond, Sampling
from dd2dist.nets.student import StudentNet
from dd2dist.teachers.base import ARTeacher


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def one_step(generator_net: StudentNet, cond: Cond, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One-step samples: (continuous tokens (B, N, Ce), nearest-code ids (B, N)).

    ``generator`` (a torch.Generator on the net's device) makes the noise reproducible.
    """
    device = _device_of(generator_net)
    B = cond.batch_size
    eps = torch.randn((B, generator_net.num_tokens, generator_net.embed_dim), generator=generator, device=device)
    q = generator_net.generate(eps, cond.to(device)).float()
    return q, generator_net.backbone.quantize(q)


@torch.no_grad()
def teacher_refined(
    generator_net: StudentNet,
    teacher: ARTeacher,
    cond: Cond,
    k: int,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """k-step sampling: the generator's sample with its last k-1 AR steps re-sampled by the teacher (Alg.4).

    The teacher is conditioned on the sequence as it stands: the generator's continuous tokens for the untouched
    prefix (as in training, where the teacher scores the generator's continuous output) and the code vectors of
    the steps it has already re-sampled. Re-sampled steps use ``sampling`` (default: the teacher's own).
    Returns (tokens (B, N, Ce), ids (B, N)); re-sampled positions hold exact code vectors.
    """
    S = len(teacher.steps)
    if not 1 <= k <= S:
        raise ValueError(f"teacher_refined: k must be in [1, {S}] (the teacher's AR steps), got {k}")
    sampling = sampling or teacher.default_sampling
    q, ids = one_step(generator_net, cond, generator)
    cond = cond.to(q.device)
    codebook = teacher.codebook().float()
    x = q.clone()
    for s in range(S - k + 1, S):
        sl = teacher.steps[s]
        lp = teacher.log_probs(x, cond, sampling)[:, sl]  # (B, n_s, V); rows of step s see steps < s only
        B, n, V = lp.shape
        new = torch.multinomial(lp.exp().reshape(B * n, V), 1, generator=generator).view(B, n)
        ids[:, sl] = new
        x[:, sl] = codebook[new]
    return x, ids


@torch.no_grad()
def ar_diffusion_ids(net, teacher: ARTeacher, labels: Tensor, gen: torch.Generator, euler_steps: int = 32,
                     batch: int = 16384) -> Tensor:
    """The stage-1 model as an AR-diffusion sampler: for each AR step, teacher-force the backbone on the tokens so
    far and integrate the head's velocity from t=1 to 0 with ``euler_steps`` Euler steps per token; snap the
    step's tokens to the nearest code before the next step (they enter the prefix as code vectors, as in GTS)."""
    codebook = teacher.codebook().float()
    out = []
    for s in range(0, labels.shape[0], batch):
        cond = Cond(labels=labels[s : s + batch])
        B = cond.batch_size
        x = torch.zeros(B, net.num_tokens, net.embed_dim)
        ids = torch.zeros(B, net.num_tokens, dtype=torch.long)
        for sl in teacher.steps:
            feats = net.features(x, cond)[:, sl]  # rows of this step see earlier steps only
            xt = torch.randn((B, feats.shape[1], net.embed_dim), generator=gen)
            for j in range(euler_steps):
                t = 1.0 - j / euler_steps
                v = net.velocity(xt, torch.full((B, feats.shape[1]), t), feats).float()
                xt = xt - v / euler_steps
            ids[:, sl] = net.backbone.quantize(xt)
            x[:, sl] = codebook[ids[:, sl]]
        out.append(ids)
    return torch.cat(out)


def load_generator(directory: str | Path, device: torch.device | str = "cpu",
                   weights_file: str = "generator.safetensors") -> tuple[StudentNet, object]:
    """Load an exported generator: (StudentNet in eval mode, its ExperimentConfig).

    The backbone structure comes from the config's teacher architecture (random init, no teacher weights are
    read); the student weights, including the frozen codebook buffers, come from ``weights_file`` in
    ``directory`` (another export of the same run, e.g. a ``stage2.ema_compare`` EMA's).
    """
    from safetensors.torch import load_file

    from dd2dist.config import load_config
    from dd2dist.teachers import build_family

    directory = Path(directory)
    weights, cfg_path = directory / weights_file, directory / "config.yaml"
    for p in (weights, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_generator: missing {p}")
    cfg = load_config(cfg_path, check_paths=False)
    arch = cfg.teacher.arch
    teacher = build_family(cfg.teacher.family, **{cfg.teacher.family: arch}).freeze()
    net = StudentNet(teacher, cfg.student, init_adapter=False)
    state = load_file(str(weights))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the architecture of {cfg_path}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return net.to(device).eval().requires_grad_(False), cfg
