"""Verify checkpoint directories by their manifests, or add a manifest to one checked by hand.

    python jobs/checkpoint_manifest.py verify DIR [DIR ...]     # exit 0 when every DIR verifies
    python jobs/checkpoint_manifest.py write DIR                # add a manifest to a checkpoint checked by hand

This process alone reads the files (no collective); the format and the checks are dd2dist/train/manifest.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from dd2dist.train.manifest import build_manifest, read_manifest, verify, write_manifest

    parser = argparse.ArgumentParser(description="Verify checkpoint directories, or add a manifest to one.")
    parser.add_argument("command", choices=("verify", "write"))
    parser.add_argument("directories", nargs="+")
    args = parser.parse_args(argv)
    code = 0
    for directory in args.directories:
        if not Path(directory).is_dir():
            print(f"{directory}: not a directory", file=sys.stderr)
            code = 1
            continue
        if args.command == "write":
            state = Path(directory) / "state.json"
            iteration = json.loads(state.read_text()).get("iteration") if state.is_file() else None
            path = write_manifest(directory, build_manifest(directory, iteration, collective=False))
            print(f"{path}: {len(read_manifest(directory)['files'])} files")
            continue
        problems = verify(directory, collective=False)
        print(f"{directory}: {'verified' if not problems else 'FAILED: ' + '; '.join(problems)}")
        code = code or (1 if problems else 0)
    return code


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
