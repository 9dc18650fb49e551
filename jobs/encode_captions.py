"""Encode captions into caption shards (the conditions of text-to-image teacher sampling), across Ray workers.

    python jobs/encode_captions.py --captions captions.jsonl --encoder SPEC --output DIR [--workers W]
        [--batch-size B] [--shard-size S]

``captions.jsonl`` holds one JSON object per line with "key" (letters, digits, _ and -) and "caption"; every other
field is kept in the sample's info.json. SPEC is ``hashed[:slots=16,width=64,seed=0]`` or ``t5:<dir>[,slots=120]``
(a local transformers T5 checkpoint; nothing is downloaded). Rerunning with the same arguments reuses or resumes
the output. Prints captions.json (without the shard list) as JSON. See dd2dist/pipelines/caption_features.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", required=True, help="JSON-lines file of {key, caption, ...} records")
    parser.add_argument("--encoder", required=True, help="text encoder spec: hashed:slots=N,width=N | t5:<dir>")
    parser.add_argument("--output", required=True, help="output directory of caption shards and captions.json")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors encoding in parallel")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per encoder call")
    parser.add_argument("--shard-size", type=int, default=1000, help="captions per shard")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from dd2dist.pipelines.caption_features import encode_captions, load_caption_records

    manifest = encode_captions(
        load_caption_records(args.captions), args.encoder, args.output, workers=args.workers,
        batch_size=args.batch_size, shard_size=args.shard_size, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
    )
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
