"""Sample the teacher into teacher-token shards (stage-1/2 training data), across Ray workers.

    python jobs/precompute_teacher_tokens.py --config CONFIG --num-samples N --output DIR [--workers W]
        [--batch-size B] [--shard-size S] [--labels FILE | --captions DIR] [--set key=value ...]

Uses the config's teacher and its target sampling (``teacher.sampling``); rerunning with the same arguments
resumes (only missing samples are generated). A text-conditional teacher needs --captions, a caption shard
directory from jobs/encode_captions.py: sample i is conditioned on caption (i mod M) of its M captions in key
order. Prints the manifest as JSON. See dd2dist/pipelines/teacher_tokens.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from functools import partial

    from dd2dist.config import add_config_args, parse_config_args
    from dd2dist.launch.preflight import validate_teacher_weights

    parser = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--num-samples", type=int, required=True, help="total samples in the output (key s0..sN-1)")
    parser.add_argument("--output", required=True, help="output directory of shards, .idx files and manifest.json")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors sampling in parallel (one shard set each)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per teacher call (data.batch_size)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--labels", default=None, help="label list file (one class id per line); default balanced")
    parser.add_argument("--captions", default=None,
                        help="caption shard directory (jobs/encode_captions.py) for a text-conditional teacher")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    needs_weights = partial(validate_teacher_weights, use="the shards would hold samples of")
    args, cfg = parse_config_args(parser, argv, check=needs_weights)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from dd2dist.pipelines.teacher_tokens import precompute_teacher_tokens

    manifest = precompute_teacher_tokens(
        cfg, args.num_samples, args.output, workers=args.workers, batch_size=args.batch_size,
        label_file=args.labels, shard_size=args.shard_size, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, captions=args.captions,
    )
    summary = {k: v for k, v in manifest.items() if k != "shards"}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
