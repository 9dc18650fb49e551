"""Stage 0 for LlamaGen (docs/method.md §6): give the teacher an MLP input adapter for continuous 8-d token inputs.

    python jobs/adapt_llamagen.py --config configs/experiments/llamagen_stage0.yaml --output DIR [--set KEY=VALUE ...]
        [--device auto|cpu|cuda]

1. Build (or load) the LlamaGen teacher of the ``teacher`` section and swap its token-embedding lookup for a fresh
   MLP over the L2-normalised codebook; regress the MLP onto ``tok_embeddings`` over all V codes (``stage0.regress_*``).
2. Fine-tune the whole GPT with LlamaGen's AR cross-entropy (``stage0.finetune_steps``, ``stage0.lr``...) on token
   shards (``data.source=shards``: real-image tokens from jobs/tokenize_images.py or teacher-token shards of this
   teacher), or, with ``data.source=online``, on sequences sampled from the original teacher's raw distribution (no
   CFG, no top-k/top-p: the fine-tune should keep the model's own conditional, which CFG is applied to later).
3. Write to DIR: ``adapted_teacher.pt`` (a dd2dist teacher state dict), ``teacher.yaml`` (a whole ``teacher:``
   section that loads it: include it with ``defaults: [DIR/teacher.yaml]``), ``report.json`` (regression error,
   loss curve, cross-entropy of the original / regressed / fine-tuned model on the same evaluation batches) and
   ``loss_curve.png``. With ``tracking.enabled`` the loss curve and the files also go to MLflow.

The fine-tune runs in one process on one device and does not checkpoint midway (a rerun starts over).
Exit codes: 0 done, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from dd2dist.conditions import Cond, Sampling, cyclic_labels  # noqa: E402
from dd2dist.config import ConfigError, add_config_args, config_from_args  # noqa: E402

CHECKPOINT_NAME = "adapted_teacher.pt"
TEACHER_YAML = "teacher.yaml"
REPORT_NAME = "report.json"
PLOT_NAME = "loss_curve.png"
# The original model's own conditional: the fine-tune target when no token shards are given.
RAW_SAMPLING = Sampling(guidance_scale=1.0, guidance_schedule="constant", top_k=0, top_p=1.0, temperature=1.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--output", metavar="DIR", required=True, help="directory of the adapted teacher and report")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    return parser.parse_args(argv)


def check_config(cfg) -> None:
    """Refuse configs stage 0 cannot run, naming the key."""
    t = cfg.teacher
    if t.family != "llamagen":
        raise ConfigError("teacher.family", f"stage 0 adapts LlamaGen teachers only (VAR takes continuous inputs "
                                            f"natively), got {t.family!r}")
    if t.official and not (t.checkpoint and t.tokenizer_checkpoint):
        key = "teacher.checkpoint" if not t.checkpoint else "teacher.tokenizer_checkpoint"
        raise ConfigError(key, f"must be set (a local file) with teacher.official={t.official!r}")
    if t.arch.input_adapter == "mlp":
        raise ConfigError("teacher.llamagen.input_adapter",
                          "the teacher already has an mlp input adapter (stage 0 was run); give the original teacher")
    if cfg.data.source == "online" and t.arch.caption_dim > 0:
        raise ConfigError("data.source", "a text-to-image teacher needs caption features from token shards "
                                         "(data.source=shards); online sampling has no captions to draw")
    if cfg.stage0.finetune_steps > 0 and cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size", "must be > 0")


# ---- data ---------------------------------------------------------------------------------------------------
def teacher_sample_batches(teacher, batch_size: int, seed: int, device) -> Iterator[tuple[torch.Tensor, Cond]]:
    """Endless (ids, Cond) batches sampled from ``teacher``'s raw distribution, class-balanced, seeded."""
    gen = torch.Generator(device=device).manual_seed(seed)
    step = 0
    while True:
        cond = Cond(labels=cyclic_labels(batch_size, teacher.num_classes, start=step * batch_size, device=device))
        ids = teacher.sample(cond, RAW_SAMPLING, generator=gen).clone()  # clone: leave inference mode behind
        step += 1
        yield ids, cond


def shard_batches(cfg, teacher, seed: int) -> Iterator[tuple[torch.Tensor, Cond]]:
    """Endless (ids, Cond) batches of ``data.shards``, streamed with ``seed``; shards of another teacher or token
    layout are refused (the teacher id keeps ``cfg.seed``, which names a randomly initialised teacher's weights)."""
    from dd2dist.data import TokenStream
    from dd2dist.data.identity import teacher_id

    data = cfg.data
    expect = {"teacher_id": teacher_id(cfg.teacher, cfg.seed), "num_tokens": teacher.num_tokens}
    stream = TokenStream(data.shards, data.batch_size, seed=seed, expect=expect, shuffle_buffer=data.shuffle_buffer,
                         num_workers=data.num_loader_workers)
    for batch in stream:
        yield batch.tokens.long(), batch.cond()


def fixed_batches(source: Iterator[tuple[torch.Tensor, Cond]], n: int) -> list[tuple[torch.Tensor, Cond]]:
    return [next(source) for _ in range(n)]


# ---- measurements -------------------------------------------------------------------------------------------
@torch.no_grad()
def cross_entropy(teacher, batches: list[tuple[torch.Tensor, Cond]]) -> float | None:
    """Mean teacher-forced AR cross-entropy (nats per token) of ``teacher`` on ``batches``, no CFG, no filtering."""
    if not batches:
        return None
    device = teacher.gpt.output.weight.device
    total, count = 0.0, 0
    for ids, cond in batches:
        ids, cond = ids.to(device), cond.to(device)
        lp = teacher.log_probs(ids, cond)
        total += -lp.gather(-1, ids[..., None]).sum().item()
        count += ids.numel()
    return total / count


def window_mean(values: list[float], first: bool) -> float | None:
    """Mean of the first (or last) tenth of a curve (at least one point)."""
    if not values:
        return None
    k = max(1, len(values) // 10)
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def plot_loss(path: str, losses: list[float], ce_original: float | None, title: str) -> None:
    """PNG of the per-step fine-tune loss, its running mean, and the original teacher's evaluation cross-entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="AR cross-entropy (per step)")
    if losses:
        k = max(1, len(losses) // 20)
        windows = [losses[max(0, i - k + 1): i + 1] for i in range(len(losses))]
        run = [sum(w) / len(w) for w in windows]
        ax.plot(steps, run, lw=1.6, label=f"running mean ({k} steps)")
    if ce_original is not None:
        ax.axhline(ce_original, color="k", ls="--", lw=1, label="original teacher (eval batches)")
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("nats / token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the job ------------------------------------------------------------------------------------------------
def adapted_teacher_section(cfg, checkpoint: str):
    """The ``teacher`` section that loads the adapted checkpoint: our own LlamaGen of the same architecture with the
    ``mlp`` input adapter (the released kind's sizes when ``official`` was set); sampling and dtype unchanged."""
    arch = replace(cfg.teacher.arch, input_adapter="mlp")
    return replace(cfg.teacher, official=None, checkpoint=checkpoint, tokenizer_checkpoint=None, llamagen=arch)


def run_stage0(cfg, output: str, device: torch.device) -> dict:
    """Regress, fine-tune, save and report (see the module docstring); returns the report dict."""
    import yaml

    from dd2dist.config.typed import to_dict
    from dd2dist.data.identity import teacher_id
    from dd2dist.teachers import build_seeded_teacher
    from dd2dist.teachers.adapt import finetune_ar, input_mlp_relative_error, regress_input_mlp, with_mlp_adapter
    from dd2dist.tracking import open_run

    s0 = cfg.stage0
    os.makedirs(output, exist_ok=True)
    t0 = time.perf_counter()
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed).to(device)
    teacher.init_buffers(device)
    if teacher.cfg != cfg.teacher.arch:  # teacher.yaml below describes cfg.teacher.arch: it must be what was loaded
        raise ValueError(f"the loaded teacher's architecture {teacher.cfg} is not the configured {cfg.teacher.arch}")

    # (1) adapter regression
    adapted = with_mlp_adapter(teacher)
    initial_err = input_mlp_relative_error(adapted)
    gen = torch.Generator().manual_seed(cfg.seed)
    rel_err = regress_input_mlp(adapted, steps=s0.regress_steps, lr=s0.regress_lr, batch_size=s0.regress_batch,
                                generator=gen)

    # (2) data: evaluation batches first, from a stream seeded apart from the training one
    if cfg.data.source == "shards":
        source = f"token shards ({cfg.data.shards})"
        train_iter = shard_batches(cfg, teacher, cfg.seed)
        eval_batches = fixed_batches(shard_batches(cfg, teacher, cfg.seed + 1), s0.eval_batches)
    else:
        source = "teacher samples drawn online (raw distribution: no CFG, no top-k/top-p)"
        train_iter = teacher_sample_batches(teacher, cfg.data.batch_size, cfg.seed, device)
        eval_batches = fixed_batches(teacher_sample_batches(teacher, cfg.data.batch_size, cfg.seed + 1, device),
                                     s0.eval_batches)
    print(f"adapt_llamagen: fine-tuning on {source}", flush=True)
    ce_original = cross_entropy(teacher, eval_batches)
    ce_regressed = cross_entropy(adapted, eval_batches)

    logger = open_run(cfg)
    losses = finetune_ar(adapted, train_iter, steps=s0.finetune_steps, lr=s0.lr, betas=tuple(s0.betas),
                         weight_decay=s0.weight_decay, grad_clip=s0.grad_clip, cond_drop_prob=s0.cond_drop_prob,
                         generator=torch.Generator().manual_seed(cfg.seed + 2))
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"the fine-tune loss became non-finite at step {bad[0]} (lower stage0.lr?)")
    ce_finetuned = cross_entropy(adapted, eval_batches)

    # (3) outputs
    ckpt = os.path.abspath(os.path.join(output, CHECKPOINT_NAME))
    torch.save({k: v.detach().cpu() for k, v in adapted.state_dict().items()}, ckpt)
    section = adapted_teacher_section(cfg, ckpt)
    teacher_yaml = os.path.join(output, TEACHER_YAML)
    with open(teacher_yaml, "w", encoding="utf-8") as fh:
        fh.write("# The stage-0 adapted LlamaGen teacher (jobs/adapt_llamagen.py). Include it as a whole section:\n"
                 f"#   defaults: [{os.path.abspath(teacher_yaml)}]\n")
        plain = {k: v for k, v in to_dict(section).items() if k != "var"}  # the VAR section does not apply
        yaml.safe_dump({"teacher": plain}, fh, sort_keys=False, default_flow_style=None)
    overrides = ["teacher.official=null", "teacher.llamagen.input_adapter=mlp", f"teacher.checkpoint={ckpt}"]
    report = {
        "teacher": cfg.teacher.official or "llamagen (own architecture)",
        "source_teacher_id": teacher_id(cfg.teacher, cfg.seed),
        "device": str(device),
        "fine_tune_data": source,
        "regression": {
            "codes": int(teacher.vocab_size), "steps": s0.regress_steps, "lr": s0.regress_lr,
            "relative_error_before": initial_err, "relative_error": rel_err,
        },
        "finetune": {
            "steps": s0.finetune_steps, "batch_size": cfg.data.batch_size, "lr": s0.lr, "betas": list(s0.betas),
            "weight_decay": s0.weight_decay, "grad_clip": s0.grad_clip, "cond_drop_prob": s0.cond_drop_prob,
            "loss_first": window_mean(losses, first=True), "loss_last": window_mean(losses, first=False),
            "loss_curve": losses,
        },
        "eval_cross_entropy": {
            "batches": s0.eval_batches,
            "original_teacher": ce_original, "after_regression": ce_regressed, "after_finetune": ce_finetuned,
        },
        "checkpoint": ckpt,
        "teacher_config": os.path.abspath(teacher_yaml),
        "distill_overrides": [f"--set {o}" for o in overrides],
        "seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(output, REPORT_NAME), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    plot_loss(os.path.join(output, PLOT_NAME), losses, ce_original,
              f"{cfg.name}: stage-0 fine-tune ({source.split(' (')[0]}); adapter rel. error {rel_err:.2e}")
    if logger is not None:
        for step, value in enumerate(losses):
            logger.log_metrics({"stage0/loss": value}, step=step)
        final = {"stage0/regression_rel_error": rel_err}
        final.update({f"stage0/eval_ce_{k}": v for k, v in report["eval_cross_entropy"].items()
                      if k != "batches" and v is not None})
        logger.log_metrics(final, step=max(0, len(losses) - 1))
        for name in (REPORT_NAME, PLOT_NAME, TEACHER_YAML):
            logger.log_artifact(os.path.join(output, name), "stage0")
        logger.close()
    return report


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.overrides = [*args.overrides, f"output_dir={args.output}"]
    try:
        cfg = config_from_args(args)
        check_config(cfg)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device", "cuda was requested but no CUDA device is available")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"adapt_llamagen: configuration error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    report = run_stage0(cfg, cfg.output_dir, device)
    summary = {k: v for k, v in report.items() if k != "finetune"}
    summary["finetune"] = {k: v for k, v in report["finetune"].items() if k != "loss_curve"}
    print(json.dumps(summary, indent=1))
    print("distill with the adapted teacher: python jobs/distill.py --config <recipe> " + " ".join(
        report["distill_overrides"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
