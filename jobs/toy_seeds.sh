#!/usr/bin/env bash
# The exact one-step check for several seeds at once, one process (one thread) per run, on a many-core host
# (7 runs side by side: VAR seeds 0-2, LlamaGen seeds 0-2, LlamaGen with V = 8 codes; ~10 minutes; no GPU used).
# It regenerates the 16-core rows of the exact-check table in docs/results.md.
#   bash jobs/toy_seeds.sh            (writes $OUT/toy_seeds.tar.gz: toy_<family>_s<seed>.json / .log)
set -u
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp}
OUT=$(mktemp -d)  # the runs write here; one archive goes to $FINAL (the device returns few files)
{ nproc; lscpu | grep -m1 'Model name'; python3 -c "import torch; print('torch', torch.__version__)"; } > "$OUT/host.txt"
run() {  # family seed train-budget-seconds max-generator-steps [extra flags]
  local fam=$1 seed=$2 budget=$3 steps=$4; shift 4
  local tag=${fam}_s${seed}${1:+_v8}
  python3 jobs/benchmark.py toy --family "$fam" --seed "$seed" --budget-seconds "$budget" --generator-steps "$steps" \
    --eval-every 120 --curve-samples 25000 --samples 500000 --multistep-samples 10000 --threads 1 "$@" --out "$OUT/toy_$tag.json" > "$OUT/toy_$tag.log" 2>&1
}
run var 0 300 1200 & run var 1 300 1200 & run var 2 300 1200 &
run llamagen 0 340 3000 & run llamagen 1 340 3000 & run llamagen 2 340 3000 &
run llamagen 0 340 3000 --vocab 8 &
wait
for f in "$OUT"/toy_*.log; do echo "== $f"; grep -A3 "^toy " "$f" | head -4; grep "curve" "$f" | tail -1; done
tar -czf "$FINAL/toy_seeds.tar.gz" -C "$OUT" .
