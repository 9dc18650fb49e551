"""Tokenise real images (image WebDataset shards) with the teacher's VQ encoder into real-image token shards.

    python jobs/tokenize_images.py --config CONFIG --images DIR_OR_PATTERN --output DIR [--image-size S]
        [--batch-size B] [--threads T] [--device auto|cpu|gpu] [--set key=value ...]

Decoding and preprocessing run in an NVIDIA DALI pipeline (CPU here, nvJPEG "mixed" decode on a GPU). Image
shards hold ``<key>.jpg|png`` + ``label.i64`` (see dd2dist/data/image_shards.py). Prints a JSON summary.
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
    parser.add_argument("--images", required=True, help="image shard directory, brace pattern or glob")
    parser.add_argument("--output", required=True, help="output directory of token shards")
    parser.add_argument("--image-size", type=int, default=None, help="default: the teacher tokenizer's resolution")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    needs_weights = partial(validate_teacher_weights, use="the shards would hold the tokens of")
    args, cfg = parse_config_args(parser, argv, check=needs_weights)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from dd2dist.pipelines.tokenize_images import tokenize_images

    summary = tokenize_images(
        cfg, args.images, args.output, image_size=args.image_size, batch_size=args.batch_size,
        num_threads=args.threads, shard_size=args.shard_size, device=args.device,
    )
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
