#!/usr/bin/env bash
# The device checks of #5 and #7 in one prepared run (one lent H100/H200, nothing else installed but PyTorch):
#   1. one true-size VAR-d16 stage-2 cycle (random weights, bf16 autocast): step time + peak memory (#5);
#   2. the speed benchmark on the GPU: one-step generator vs the teacher's KV-cached sampler vs one
#      teacher-forced pass, VAR-d16 / LlamaGen-L / the digits teachers, batch 1 and 64 (#7).
# Usage on the device machine, from the repo root:  bash docs/gpu_raw/gpu_checks.sh   (writes into $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
for b in 32 128; do
  timeout 150 python3 jobs/benchmark.py train --gpu --geometry var_d16 --batch "$b" --k 2 --gpu-cycles 3 \
    --out "$OUT/train_var_d16_b$b.json" 2>&1 | grep -v '^ \{2,\}' | tail -25 || echo "train b=$b failed"
done
timeout 240 python3 jobs/benchmark.py speed --models var_d16,llamagen_l,digits_var,digits_llamagen --device cuda \
  --dtype bf16 --batch-sizes 1,64 --repeats 5 --warmup 2 --quiet --out "$OUT/speed_gpu.json" 2>&1 | tail -20 \
  || echo "speed failed"
ls -la "$OUT"
