#!/usr/bin/env bash
# A short GPU check for a session with ~15 minutes of device time (one call of at most 10 minutes):
#   1. the gpu test lane, 16 xdist workers (150 s; session 9's lane took ~120 s to its first failures);
#   2. the decode-kernel sweep (tl.dot vs fma tiles, K splits up to 128) on the two Llama-3-8B MLP shapes
#      for the cases in SWEEP_CASES (no new case after 110 s), then every kernel against cuBLAS bf16 and
#      TorchAO, L2 cold (200 s; sweep + comparison took about 150 s in session 7 with four cases);
#   3. whole-model greedy decode tok/s of the Llama-3.2-1B-shaped zoo model in bf16 under CUDA graphs:
#      eager, effcompile configs (~40 s each in session 9) next to TorchAO's int4 / int8 kernels without
#      Inductor (seconds to build), then TorchAO compiled and torch.compile last: each is two or more
#      Inductor compiles of the model, and in session 7 (H100) a TorchAO int4 config did not finish
#      within 200 s (210 s).
# Each step has its own time limit and writes under $OUT (default benchmarks/results/gpu-quick) as it goes,
# so a step stopped by its limit keeps what it measured and the next step still runs. TorchAO comes from
# wheels in .whl/ when they are there (the device image has none): carry .whl.
#
#   OUT=$OUT benchmarks/gpu_quick.sh          # on the device machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-benchmarks/results/gpu-quick}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,clocks.max.sm --format=csv; date -u;
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)";
  "$PY" -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1; } | tee "$OUT/device.txt"
# 1. tests
timeout 150 "$PY" -m pytest -q -m gpu -n 16 -p no:cacheprovider tests/gpu 2>&1 | grep -v "Benchmark" \
    | tail -40 | tee "$OUT/gpu-tests.log"
# 2. kernels
timeout 200 "$PY" benchmarks/kernels.py --device cuda --sweep --sweep-budget-s 110 --tuning-out "$OUT/tuning.json" \
    --sweep-cases "${SWEEP_CASES:-dequant/int4,sparse/int4,sparse/float,sparse/int8}" \
    --shapes 8b.up,8b.down --output "$OUT/kernels.json" 2>&1 | grep -v "^  config" | tee "$OUT/kernels.log"
# 3. decode, with the tile table step 2 wrote (if it got that far) over the shipped one
[ -s "$OUT/tuning.json" ] && export EFFCOMPILE_KERNEL_TUNING="$OUT/tuning.json"
timeout 210 "$PY" benchmarks/decode.py --device cuda --dtype bfloat16 --model llama-1b --steps 16 \
    --configs "${DECODE_CONFIGS:-quantize(weights=int4,group_size=128);torchao-int4-eager;threshold(sparsity=0.5);quantize(weights=int8);torchao-int8-eager;threshold(sparsity=0.5)+quantize(weights=int4,group_size=128);none;torchao-int4;torch.compile}" \
    --out "$OUT/decode.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tee "$OUT/decode.log"
echo "gpu_quick: done; results in $OUT"
