"""Train (or reuse) a small class- or text-conditional digits teacher: VQ tokenizer + AR transformer.

    python jobs/train_teacher.py --config configs/teachers/digits_var.yaml          --out runs/teachers
    python jobs/train_teacher.py --config configs/teachers/digits_llamagen.yaml     --out runs/teachers --quick
    python jobs/train_teacher.py --config configs/teachers/digits_llamagen_t2i.yaml --out runs/teachers

Writes ``<out>/teacher-<key>.pt`` (loadable as ``teacher.checkpoint``), ``.json`` (quality report) and ``.yaml``
(the config with ``teacher.checkpoint`` set: pass it as ``--config`` to the distillation jobs). ``<key>`` hashes
the teacher architecture, the training recipe and the seed: a rerun with the same inputs reuses the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from dd2dist.config import add_config_args, parse_config_args
    from dd2dist.digits.recipe import FULL, FULL_T2I, QUICK
    from dd2dist.digits.teacher_job import train_digits_teacher
    from dd2dist.digits.text_teacher import is_text_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="directory of the cached teacher checkpoints and reports")
    parser.add_argument("--quick", action="store_true", help="seconds-long recipe for tests (quality meaningless)")
    parser.add_argument("--no-eval", action="store_true", help="skip the sample-quality report")
    args, cfg = parse_config_args(parser, argv)
    recipe = QUICK if args.quick else FULL_T2I if is_text_teacher(cfg) else FULL
    report = train_digits_teacher(cfg, args.out, recipe, evaluate=not args.no_eval)
    summary = {k: report.get(k) for k in ("family", "checkpoint", "config", "reused", "seconds")}
    if "quality" in report:
        q = report["quality"]
        summary.update(fid_teacher=q["teacher"]["fid"], class_consistency_teacher=q["teacher"].get("class_consistency"),
                       class_mix_tv_teacher=q["teacher"].get("class_mix_tv"))  # the second for unconditional ones
        if "reference_train_vs_heldout" in q:  # class teachers
            summary["fid_train_vs_heldout"] = q["reference_train_vs_heldout"]["fid"]
        summary["fid_reconstructions"] = q["reference_reconstructions"]["fid"]
        for kind, scores in q.get("prompt_adherence", {}).items():  # text teachers
            summary[f"prompt_adherence_{kind}"] = {
                "class_accuracy": scores["class_accuracy"], "property_agreement": scores["property_agreement"]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
