"""What a generator's backbone can see of its earlier noise: a linear probe from later positions' features.

The one-step generator makes token i from its own noise eps_i and backbone features f_i of the noise of earlier AR
steps. For the tokens to depend on each other as the teacher's do, f_i must carry what the generator did at earlier
positions, i.e. (a function of) their noise. This probe measures how much of an earlier position's noise vector a
later position's features hold: ridge regression from f_i to eps_j (j in an earlier AR step) fitted on half of the
draws, R^2 on the other half, averaged over pairs. A backbone that reads every earlier vector only through its
nearest code (LlamaGen's soft input rule) keeps just the code cell of eps_j; a continuous input path keeps more.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dd2dist.conditions import Cond, cyclic_labels


def ridge_r2(x: Tensor, y: Tensor, train: int, ridge: float = 1e-3) -> float:
    """R^2 on rows ``train:`` of a ridge regression of ``y`` (M, k) on ``x`` (M, d) fitted on rows ``:train``."""
    x, y = x.double(), y.double()
    mu_x, mu_y = x[:train].mean(0), y[:train].mean(0)
    xc, yc = x - mu_x, y - mu_y
    a = xc[:train]
    w = torch.linalg.solve(a.T @ a + ridge * train * torch.eye(a.shape[1], dtype=a.dtype), a.T @ yc[:train])
    resid = yc[train:] - xc[train:] @ w
    total = (y[train:] - y[train:].mean(0)).pow(2).sum()
    return float(1.0 - resid.pow(2).sum() / total.clamp_min(1e-12))


@torch.no_grad()
def noise_recoverability(net, steps: list[slice], num_classes: int, num: int = 4000, seed: int = 0,
                         max_pairs: int = 16) -> dict:
    """Mean probe R^2 of earlier noise vectors from later positions' generator features.

    ``net``: a StudentNet or its sampling form (``backbone.features``); ``steps``: the teacher's AR steps. Pairs
    (j, i) with j the first position of an earlier step and i the first position of the next step; at most
    ``max_pairs`` of them. Returns ``mean`` and ``by_pair`` ({"j->i": R^2}).
    """
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((num, net.num_tokens, net.embed_dim), generator=gen)
    labels = cyclic_labels(num, max(1, num_classes))
    feats = net.backbone.features(eps, Cond(labels=labels)).float()
    pairs = [(steps[s].start, steps[s + 1].start) for s in range(len(steps) - 1)][:max_pairs]
    train = num // 2
    by_pair = {f"{j}->{i}": ridge_r2(feats[:, i], eps[:, j], train) for j, i in pairs}
    return {"mean": sum(by_pair.values()) / max(1, len(by_pair)), "by_pair": by_pair, "samples": num}


def probe_run(run_dir: str | Path, samples: int = 4000) -> dict:
    """The probe for a run's exported generator, its regression export and its stage-1 student (those it has):
    ``{"run", "family", "nets": {name: noise_recoverability(...)}}``."""
    from dd2dist.eval.fidelity import REGRESSION_EXPORT, run_config
    from dd2dist.eval.run_eval import find_stage1_weights, load_student_weights
    from dd2dist.eval.sampling import load_generator
    from dd2dist.nets.student import StudentNet
    from dd2dist.teachers import build_seeded_teacher

    run = Path(run_dir)
    cfg = run_config(run)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    nets = {}
    for name, weights in (("generator", "generator.safetensors"), ("regression", REGRESSION_EXPORT)):
        if (run / "export" / weights).is_file():
            nets[name] = load_generator(run / "export", weights_file=weights)[0]
    stage1 = find_stage1_weights(run)
    if stage1 is not None:
        net = StudentNet(teacher, cfg.student, init_adapter=False)
        net.load_state_dict(load_student_weights(stage1))
        nets["stage1"] = net.eval()
    return {"run": str(run), "family": teacher.family,
            "nets": {name: noise_recoverability(net, teacher.steps, teacher.num_classes, samples)
                     for name, net in nets.items()}}
