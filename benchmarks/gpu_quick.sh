#!/usr/bin/env bash
# A short GPU check for a session with ~15 minutes of device time (one call of at most 10 minutes):
# the gpu test lane, then the kernel sweep (tl.dot vs fma decode tiles, K splits up to 64) and the
# kernel comparison against cuBLAS bf16 and TorchAO on the two Llama-3-8B MLP shapes. Everything is
# written under $OUT (default benchmarks/results/gpu-quick) as it is measured, so a run stopped by its
# time limit keeps what it had. Untimed end to end; budgets per step below.
#
#   OUT=$OUT benchmarks/gpu_quick.sh          # on the device machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-benchmarks/results/gpu-quick}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# 1. gpu tests (74 s on an H200 in session 2).
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu-tests.log"
# 2. sweep the decode kernels, then time them with the swept table (TorchAO included when it imports).
timeout 360 "$PY" benchmarks/kernels.py --device cuda --sweep --tuning-out "$OUT/tuning.json" \
    --shapes 8b.up,8b.down --output "$OUT/kernels.json" 2>&1 | grep -v "^  config" | tee "$OUT/kernels.log"
echo "gpu_quick: done; results in $OUT"
