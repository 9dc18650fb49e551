"""Distil an AR teacher into a one-step generator on Ray Train + DeepSpeed (thin: parse -> validate -> launch).

    python jobs/distill.py --config configs/experiments/smoke_var_deepspeed.yaml [--set KEY=VALUE ...] [--output DIR]
    python jobs/distill.py --config configs/experiments/smoke_var_deepspeed.yaml --dry-run     # build all, 1 step, exit
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/distill.py --config ...

With no RAY_ADDRESS an embedded local Ray is started. Rerunning with the same name (and output) resumes from the
newest checkpoint that verifies. The EMA generator is exported to <output>/export/generator.safetensors (+
config.yaml); with compact_head.enabled its compact sampling head is then fitted to it
(generator_compact_head.safetensors). One run at a time owns an output directory (<output>/run.lock);
SIGTERM or Ctrl-C stops every rank after its step with a checkpoint (docs/run_safety.md).
Exit codes: 0 done, 1 training failed, 2 bad configuration or shards of another teacher (nothing was started),
3 the output directory belongs to another live run (nothing was started) or was taken over during the run,
75 stopped by SIGTERM / Ctrl-C with a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

LOCKED_EXIT = 3  # the output directory belongs to another run


def parse_args(argv: list[str]) -> argparse.Namespace:
    from dd2dist.config import add_config_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--output", metavar="DIR", default=None, help="run directory (default: runs/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="validate, build everything, run 1 step, exit")
    parser.add_argument("--max-iterations", type=int, default=None, help="stop at this global iteration")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from dd2dist.launch.quiet import quiet_driver

    quiet_driver()  # before anything imports Ray
    from dd2dist.config import ConfigError, config_from_args

    args = parse_args(argv)
    if args.output:
        args.overrides = [*args.overrides, f"output_dir={args.output}"]
    try:
        cfg = config_from_args(args)
        from dd2dist.launch.preflight import validate_run

        validate_run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"distill: configuration error: {err}", file=sys.stderr)
        return 2
    from dd2dist.launch.preemption import PREEMPTED_EXIT
    from dd2dist.launch.ray_train import launch
    from dd2dist.launch.run_lock import RunLocked

    try:
        summary = launch(cfg, dry_run=args.dry_run, max_iterations=args.max_iterations)
    except RunLocked as err:
        print(f"distill: {err}", file=sys.stderr)
        return LOCKED_EXIT
    except Exception as err:  # report and exit non-zero; the traceback is in the Ray logs above
        print(f"distill: training failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    stopped = summary.get("preempted")
    if stopped:
        print(json.dumps(summary, indent=1))
        if not stopped["checkpoint"]:
            print(f"distill: stopped at iteration {stopped['iteration']} without a checkpoint: {stopped['reason']}",
                  file=sys.stderr)
            return LOCKED_EXIT
        print(f"distill: stopped at iteration {stopped['iteration']} ({stopped['reason']}); checkpoint "
              f"{stopped['checkpoint']}; rerun the same command to resume", file=sys.stderr)
        return PREEMPTED_EXIT
    if cfg.compact_head.enabled and not args.dry_run and summary.get("export"):
        from dd2dist.eval.compact import export_compact_head

        try:
            summary["compact_head"] = export_compact_head(cfg)
        except (FileNotFoundError, ValueError) as err:
            print(f"distill: compact head not fitted: {err}", file=sys.stderr)
            return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # ZeRO-3 process groups can abort at interpreter exit after the work is done (docs/environment.md §3):
    # skip finalisers.
    os._exit(code)
