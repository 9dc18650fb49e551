"""Benchmarks: scripts that print their figures and save them as JSON (never timed tests).

    python jobs/benchmark.py toy   --family var --seed 0 --out runs/bench/toy_var.json   # exact one-step check
    python jobs/benchmark.py data  --out runs/bench/data.json                            # streaming / DALI / sampling
    python jobs/benchmark.py train --out runs/bench/train.json                           # stage-2 iteration on Ray
    python jobs/benchmark.py speed --out runs/bench/speed.json                           # one-step vs AR sampler
    python jobs/benchmark.py fidelity --run runs/demo/var --out runs/bench/fidelity_var.json  # samplers vs teacher
    python jobs/benchmark.py probe --run runs/demo/llamagen                              # earlier noise seen?
    python jobs/benchmark.py manifest --out runs/bench/manifest.json                     # checkpoint manifest cost

Each subcommand lives in its subsystem and takes its own flags (``python jobs/benchmark.py toy --help``).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

SUBCOMMANDS = {
    "toy": "dd2dist.bench.toy",
    "data": "dd2dist.bench.data",
    "train": "dd2dist.bench.train",
    "speed": "dd2dist.eval.speed",
    "fidelity": "dd2dist.eval.fidelity",
    "probe": "dd2dist.eval.noise_probe",
    "manifest": "dd2dist.bench.checkpoint_manifest",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown benchmark {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
