"""`make demo`: the whole DD2 pipeline end to end on scikit-learn's digits, for both teacher families.

    python jobs/demo.py                                   # full demo (both families), writes runs/demo/
    python jobs/demo.py --quick --out /tmp/demo_quick     # the same path at smoke-test size (tests)
    python jobs/demo.py --families var --out runs/demo_var --set stage2.generator_steps=600   # any recipe key
    python jobs/demo.py --case unconditional              # the harder case: teachers without class labels,
                                                          # writes runs/demo_unconditional/ (--quick works too)
    python jobs/demo.py --t2i                             # text-to-image: captions -> one-step, writes runs/demo_t2i/

Per family (``var``, ``llamagen``), with the recipe ``configs/demo/[smoke_]<family>.yaml`` (``--case unconditional``:
``configs/demo/[smoke_]<family>_unconditional.yaml``, whose teachers are trained with one label for every digit, so
that the tokens of a sample must agree among themselves on which digit they draw):

1. teacher: train (or reuse, cached by config hash) the small VQ tokenizer + AR teacher on the digits train split
   (``dd2dist.digits.teacher_job``: PNG shards -> DALI -> token shards -> AR training);
2. teacher-token shards: the teacher sampled with the distillation target across 2 Ray actors
   (``dd2dist.pipelines.teacher_tokens``);
3. stage 1 (GTS) then stage 2 (CSD / FCS) with 2 DeepSpeed workers under Ray Train on one embedded local Ray
   (``dd2dist.launch.ray_train.launch``), one launch for both stages; the workers export the stage-1 student
   when stage 2 takes over, so that it can be evaluated; then, where the recipe sets ``compact_head.enabled``, a
   compact sampling head is regressed onto the generator's head (``dd2dist.nets.compact_head``: the one-step
   generator's speed at the digits size is its head's);
4. evaluation against the held-out digits in the digits-classifier feature space (torch-fidelity FID, IS,
   precision / recall; class consistency): teacher samples, the stage-1 model used as a one-step generator, the
   DD2 one-step generator (continuous tokens decoded as they are, snapped to the nearest codes, and sampled with
   the compact head on the same noise), teacher-refined
   k-step sampling and the product-of-marginals baseline (tokens drawn independently per position from the
   class-conditional marginals of the teacher-token shards);
5. sample grids and loss curves (PNG), the metrics and artefacts logged to the family's MLflow run.

Writes ``<out>/results.json`` (per family: ``fid_*``, ``precision_*``, ``recall_*``, ``class_consistency_*``,
``seconds``, the sampling settings, classifier accuracy, MLflow run) and ``<out>/results.md`` (the tables).
``--t2i`` runs the text-to-image demo instead (``dd2dist.demo.t2i``, recipe ``configs/demo/[smoke_]llamagen_t2i.yaml``):
captioned digits -> the text-conditional LlamaGen digits teacher -> caption features across Ray actors -> teacher-token
shards conditioned on the captions -> stage 1 + stage 2 on 2 DeepSpeed workers -> prompt adherence (seen and held-out
phrasings) and FID to the teacher's own samples with its floor -> MLflow and ``<out>/results.json``.

Every run of the demo trains the students afresh; teachers and teacher-token shards are reused when present.
Exit codes: 0 done, 2 bad arguments / configuration, 1 a stage failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    # before torch is imported (by the pipeline): one thread per process, and DeepSpeed on its CPU accelerator
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dd2dist.launch.quiet import quiet_driver

    quiet_driver()  # before anything imports Ray
    from dd2dist.demo.pipeline import CASES, FAMILIES, DemoArgs, run_demo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test size (configs/demo/smoke_*.yaml)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: var,llamagen")
    parser.add_argument("--case", default="conditional", choices=list(CASES),
                        help="the digits teachers: conditioned on the class, or unconditional (one label for every "
                             "digit, so a sample's tokens must agree on their digit; default --out "
                             "runs/demo_unconditional)")
    parser.add_argument("--t2i", action="store_true", help="the text-to-image demo (default --out runs/demo_t2i)")
    parser.add_argument("--out", default=None,
                        help="demo directory (results.json, one folder per family); runs/demo, or runs/demo_t2i")
    parser.add_argument("--teachers", default=None,
                        help="teacher cache directory (default: runs/teachers, or <out>/teachers with --quick)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a key of every family's recipe, e.g. --set stage2.generator_steps=600")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the students an earlier demo run trained under --out (no training)")
    args = parser.parse_args(argv)
    if args.t2i:
        if args.eval_only or args.case != "conditional":
            parser.error("--eval-only and --case are not available with --t2i")
        from dd2dist.demo.t2i import run_t2i_demo

        return run_t2i_demo(args.quick, args.out or "runs/demo_t2i", args.teachers, tuple(args.overrides))
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        parser.error(f"--families: unknown {bad or list(families)}; choose from {', '.join(FAMILIES)}")
    out = args.out or ("runs/demo" if args.case == "conditional" else f"runs/demo_{args.case}")
    untrained = [f for f in families if args.eval_only and not (Path(out) / f / "config.yaml").is_file()]
    if untrained:
        parser.error(f"--eval-only: no trained run of {', '.join(untrained)} under {out} (<family>/config.yaml is "
                     "missing); run the demo there first, or name a finished demo's folder with --out")
    return run_demo(DemoArgs(quick=args.quick, families=families, out=out, teachers=args.teachers,
                             overrides=tuple(args.overrides), eval_only=args.eval_only, case=args.case))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
