"""Scan a directory of token shards and report what is wrong, as JSON.

    python -m data_pipelines.validate DIR [--teacher-id ID] [--max-errors N]
    python data_pipelines/validate.py DIR

Prints the report of :func:`dd2dist.data.validation.validate_dir` (every sample of every ``*.tar`` read through
the training decoder, each ``.idx`` checked against its tar); exits 0 when everything is clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a directory of token shards; exit 0 when clean.")
    parser.add_argument("directory")
    parser.add_argument("--teacher-id", default=None, help="refuse (and report) shards of any other teacher")
    parser.add_argument("--max-errors", type=int, default=100, help="error details listed in the report")
    args = parser.parse_args(argv)
    # Imported here: run as a script, this file puts the repository root on sys.path just before main().
    from dd2dist.data.validation import validate_dir

    logging.basicConfig(level=logging.ERROR)  # the details are in the JSON; keep stdout parseable
    try:
        report = validate_dir(args.directory, args.teacher_id, args.max_errors)
    except FileNotFoundError as e:
        print(json.dumps({"ok": False, "errors": [{"kind": "not_found", "message": str(e)}]}))
        return 1
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
