"""Fit the compact sampling head of a trained run and write it beside its generator (thin: parse -> fit -> save).

    python jobs/compact_head.py --config runs/demo/var/export/config.yaml
    python jobs/compact_head.py --config runs/demo/var/export/config.yaml --set compact_head.width=96 \
        --set compact_head.rank=24
    python jobs/evaluate.py --config runs/demo/var/export/config.yaml --methods one_step,one_step_compact

The run directory is the config's ``output_dir``; the geometry and schedule are ``compact_head.*`` (the fit runs
whether or not ``compact_head.enabled`` is set). Writes ``<run>/export/generator_compact_head.safetensors`` + ``.json``.
Exit codes: 0 done, 2 bad configuration or no exported generator.
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
    parser.add_argument("--generator", default="generator.safetensors",
                        help="which export of the run to fit to (a file in <run>/export)")
    args, cfg = parse_config_args(parser, argv)

    from dd2dist.eval.compact import export_compact_head

    try:
        report = export_compact_head(cfg, generator_file=args.generator)
    except (FileNotFoundError, ValueError) as err:
        print(f"compact_head: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
