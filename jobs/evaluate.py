"""Evaluate a run: teacher samples, stage-1 model, exported one-step generator, teacher-refined k-step.

    python jobs/evaluate.py --config configs/experiments/X.yaml [--set eval.num_samples=500] [--methods one_step]
    python jobs/evaluate.py --config runs/teachers/teacher-<key>.yaml --methods teacher       # a teacher alone
    python jobs/evaluate.py --config runs/demo/llamagen/config.yaml --tokens runs/demo/llamagen/tokens  # + token TV
    python jobs/evaluate.py --config runs/X/llamagen/export/config.yaml --methods one_step \
        --generator generator_ema0.995.safetensors --out runs/X/llamagen/eval_ema0.995 --no-tracking  # another EMA

The run directory is the config's ``output_dir``. FID / IS / precision / recall go through torch-fidelity: the
digits-classifier space for 16x16 10-class teachers, else InceptionV3 with ``eval.inception_weights`` against
``eval.reference_npz``. With ``--tokens`` (teacher-token shards) every method also gets its token-marginal TV
against them. Writes ``<run>/eval/report.json`` + sample grids and logs them to the run's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from dd2dist.config import add_config_args, parse_config_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--methods", default=None,
                        help="comma list of teacher, stage1, one_step, one_step_snapped, refined "
                             "(default: every one whose weights exist)")
    parser.add_argument("--num-samples", type=int, default=None, help="default: eval.num_samples")
    parser.add_argument("--stage1", default=None, help="stage-1 student weights (file or checkpoint step dir)")
    parser.add_argument("--space", default="auto", choices=("auto", "digits", "inception"))
    parser.add_argument("--generator", default="generator.safetensors",
                        help="which export of the run the one-step methods sample (a file in <run>/export, e.g. "
                             "generator_ema0.995.safetensors from stage2.ema_compare)")
    parser.add_argument("--out", default=None, help="output directory (default: <run>/eval)")
    parser.add_argument("--tokens", default=None,
                        help="teacher-token shard directory: also report each method's token-marginal TV against it")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args, cfg = parse_config_args(parser, argv)

    from dd2dist.eval.run_eval import evaluate_run, log_to_mlflow

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    try:
        reference = None
        if args.tokens:
            from dd2dist.eval.token_marginals import shard_token_counts

            arch = cfg.teacher.arch
            reference = shard_token_counts(args.tokens, arch.num_classes, arch.tokenizer.vocab_size)
        report = evaluate_run(cfg, methods, args.num_samples, args.stage1, args.space, args.out,
                              token_reference=reference, generator_file=args.generator)
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    run_id = None if args.no_tracking else log_to_mlflow(cfg, report)
    table = {m: {k: r.get(k) for k in ("fid", "precision", "recall", "class_consistency")}
             for m, r in report["results"].items()}
    print(json.dumps({"report": report["report_path"], "mlflow_run_id": run_id, "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
