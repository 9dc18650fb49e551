"""How much dependence a one-pass causal generator of the student's size reaches with an exact loss.

The DD2 generator makes token i in one forward pass from its own noise eps_i and backbone features of the noise of
earlier AR steps. For its tokens to depend on each other as the teacher's do, the features at position i must
reproduce what the generator itself decided at every earlier position, from their noise alone. When the one-step
generator misses the teacher's joint, two causes are possible: CSD's training signal (a continuous generator, a
learned guidance network, gradients that vanish once outputs sit on codes) or that map itself.

This diagnostic removes the first cause. Its generator (:func:`categorical_one_pass`) has the student's backbone on
the same shifted-noise input, but categorical outputs (stage 2's ``student.generator_output: categorical``, here
trained from the teacher's copy in one process): token i is the code that the inverse CDF of its code logits'
``softmax(logits_i)`` picks at ``u_i = Phi(eps_i[0])``. Given the noise of earlier steps the token's distribution
is then exactly ``softmax(logits_i)``, so the generator can be trained on its own samples with an exact, low-variance
loss that needs no guidance network: at every position, the KL from the teacher's distillation target given the
generator's own (discrete) prefix to ``softmax(logits_i)``. Its minimum is reached only when the logits
at position i equal the teacher's conditional given the prefix the generator produced, i.e. when the backbone
recovers the earlier tokens from the earlier noise; then the two joints are equal.

So its dependence captured (:mod:`dd2dist.eval.fidelity`) is what the one-pass map of this size reaches, in the
given number of steps, when the loss is not in the way. Well above the DD2 generator's: DD2's training of the map
(continuous outputs, CSD, a learned guidance network, all removed here together) is what holds it back; measured so
on the VAR digits teacher (docs/results.md §3). About the same or below: following the teacher's chain from the
noise is itself the hard part; measured so on the LlamaGen one. (It is not a strict upper bound for DD2: CSD only
asks the generator's conditionals *given the prefix* to match, so a DD2 generator may also use its noise as a latent
shared by all positions, which this loss rules out.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dd2dist.conditions import Cond
from dd2dist.config.schema import StudentConfig
from dd2dist.engine.optim import OptimSpec, param_groups
from dd2dist.method.losses import categorical_kl
from dd2dist.method.seeding import make_generator
from dd2dist.nets.categorical import CODE_ORDERS
from dd2dist.nets.student import StudentNet
from dd2dist.teachers.base import ARTeacher


def categorical_one_pass(teacher: ARTeacher, noise_input: str = "mlp", extra_layers: int = 0,
                         code_order: str = "index", neighbour_picks: str = "none") -> StudentNet:
    """The diagnostic's generator: a fresh student of ``teacher`` with categorical outputs
    (``student.generator_output: categorical``, :mod:`dd2dist.nets.categorical`), the continuous input path as
    ``noise_input`` says and the codes in ``code_order`` in the CDF. At the start the logits at position i are the
    teacher's raw conditionals given the earlier noise read as tokens.

    ``extra_layers`` (LlamaGen): that many more transformer blocks after the copied ones, each starting as the
    identity (zero output projections). Position i can read what position i-1 computed at a layer only in the next
    layer, so a chain of tokens each drawn from the conditional given the earlier ones can be followed exactly
    through at most about as many positions as there are layers; extra layers test whether depth is the limit.

    ``neighbour_picks``: the head also reads the codes picked at each position's left / upper neighbours (LlamaGen)
    or at its place in the earlier scales (VAR) (``student.neighbour_picks``, :mod:`dd2dist.nets.neighbour_picks`)."""
    if code_order not in CODE_ORDERS:
        raise ValueError(f"code_order must be one of {CODE_ORDERS}, got {code_order!r}")
    net = StudentNet(teacher, StudentConfig(noise_input=noise_input, posterior_head=True,
                                            generator_output="categorical", categorical_order=code_order,
                                            neighbour_picks=neighbour_picks))
    if extra_layers:
        add_identity_layers(net.backbone, extra_layers)
    return net


def add_identity_layers(backbone: ARTeacher, count: int) -> None:
    """Append ``count`` fresh LlamaGen blocks that start as the identity (their attention and FFN output projections
    are zero) to ``backbone``'s layers."""
    if backbone.family != "llamagen":
        raise ValueError(f"extra_layers: only LlamaGen backbones, not {backbone.family!r}")
    from dd2dist.teachers.llamagen import TransformerBlock

    gpt = backbone.gpt
    device = gpt.norm.weight.device
    for _ in range(count):
        block = TransformerBlock(gpt.cfg).to(device)
        for linear in (block.attention.wqkv, block.feed_forward.w1, block.feed_forward.w3):
            nn.init.normal_(linear.weight, std=0.02)
        for linear in (block.attention.wo, block.feed_forward.w2):
            nn.init.zeros_(linear.weight)
        gpt.layers.append(block)


@dataclass
class CeilingOptions:
    """Training of the categorical one-pass generator."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    noise_input: str = "mlp"
    extra_layers: int = 0
    code_order: str = "index"
    neighbour_picks: str = "none"
    neighbour_picks_lr_scale: float = 1.0  # the neighbour-picks head's LR as a multiple of lr (stage2's setting)
    divergence: str = "forward"  # stage2.categorical_divergence
    seed: int = 0
    log_every: int = 100


def train_ceiling(teacher: ARTeacher, sampling, opts: CeilingOptions,
                  log: Callable[[str], None] = print) -> tuple[StudentNet, dict]:
    """Train a :func:`categorical_one_pass` generator on its own samples against the teacher's target ``sampling``.

    Each step draws classes and noise from generators seeded by (seed, step), picks the tokens, asks the teacher
    for its target given that prefix and takes one AdamW step on the mean per-position KL. Returns the net (eval
    mode) and the curve: KL (nats per sequence) per logged step and per position over the last ``log_every``
    steps."""
    net = categorical_one_pass(teacher, opts.noise_input, opts.extra_layers, opts.code_order, opts.neighbour_picks)
    params = [p for p in net.parameters() if p.requires_grad]  # the unused MLP head gets no gradient: AdamW skips it
    scales = (("neighbour_picks.", opts.neighbour_picks_lr_scale),) if net.neighbour_picks is not None else ()
    groups = param_groups(net, OptimSpec(lr=opts.lr, lr_scales=scales))
    for group in groups:
        group["lr"] = opts.lr * group["lr_scale"]  # LambdaLR scales each group's own base LR
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, opts.warmup_steps)))
    C, N, Ce = int(teacher.num_classes), net.num_tokens, net.embed_dim
    curve: list[dict] = []
    window: list[Tensor] = []
    t0 = time.perf_counter()
    for step in range(opts.steps):
        gen = make_generator(opts.seed, 0, step, "one_pass_ceiling")
        labels = torch.randint(0, C, (opts.batch_size,), generator=gen)
        eps = torch.randn((opts.batch_size, N, Ce), generator=gen)
        cond = Cond(labels=labels)
        kl, _ = categorical_kl(net, teacher, eps, cond, sampling, opts.divergence)  # (B, N): per position
        loss = kl.sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        optimizer.step()
        schedule.step()
        window.append(kl.detach().mean(0))
        if (step + 1) % opts.log_every == 0 or step + 1 == opts.steps:
            by_position = torch.stack(window).mean(0)
            window.clear()
            curve.append({"step": step + 1, "kl": float(by_position.sum()),
                          "kl_by_position": [round(float(v), 4) for v in by_position],
                          "seconds": round(time.perf_counter() - t0, 1)})
            log(f"  one-pass ceiling step {step + 1}: KL {curve[-1]['kl']:.3f} nats per sequence")
    return net.eval().requires_grad_(False), {"curve": curve, "seconds": round(time.perf_counter() - t0, 1),
                                               "options": asdict(opts)}


def ceiling_benchmark(run_dir: str | Path, opts: CeilingOptions, fidelity_opts=None,
                      log: Callable[[str], None] = print) -> dict:
    """Train the categorical one-pass generator on a run's teacher and score it with the fidelity benchmark
    beside the teacher's second draw and the product of marginals (and, where given in ``fidelity_opts``, the run's
    own samplers): the report of :func:`dd2dist.eval.fidelity.fidelity_benchmark` plus ``ceiling_training``."""
    from dd2dist.eval.fidelity import FidelityOptions, fidelity_benchmark, run_config
    from dd2dist.teachers import build_seeded_teacher

    cfg = run_config(run_dir)
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).freeze()
    torch.manual_seed(opts.seed)  # the copied backbone's fresh input path
    net, training = train_ceiling(teacher, cfg.teacher.sampling, opts, log)
    fidelity_opts = fidelity_opts or FidelityOptions(samplers=("teacher", "marginals", "one_step"))
    report = fidelity_benchmark(run_dir, fidelity_opts, extra_nets={"one_pass_categorical": net}, log=log)
    report["ceiling_training"] = training
    return report
