#!/usr/bin/env bash
# A short GPU check for a session with ~15 minutes of device time (calls of at most 10 minutes). Steps, run in
# the order STEPS names them (default: tests,kernels,decode):
#   tests   the gpu test lane, 16 xdist workers (TESTS_S, 170 s; session 10's lane of ~340 tests took 146 s; session
#           27's of 679 ran 252 in 134 s on an H200, its int4 tests ~40 s each against ~1 s for int8, before
#           tests/conftest.py gave each worker one thread per core of its share; TESTS_K: a pytest -k expression to run
#           part of it). Stopped at its limit by SIGINT, so pytest still names its failures and writes gpu-tests.xml;
#   kernels the decode-kernel sweep (tl.dot, fma and compact tiles, K splits up to 128) for the cases in
#           SWEEP_CASES, in that order (kernel/format at every SWEEP_BATCHES, 1,8, or kernel/format/mN at
#           batch N; default: one-row sparse int4 first, never swept (session 10's compacted tiles, session 17's
#           flat ones; the decode step's thresholds x int4 rows use its pick), then session 14's untimed changes,
#           one-row int4 and the sparse masked prefetch, then int4 at 8 rows, never swept since its scale-word
#           tiles were added in session 11), on
#           SWEEP_SHAPES (the two Llama-3-8B MLP shapes and the four GEMVs of the 1B decode model; a shape
#           clearly faster with a tile of its own gets a shape-keyed entry; no new case after SWEEP_S, 110 s:
#           session 13 swept 3 case-batches in that, ~35 s each), then every kernel against cuBLAS bf16 and TorchAO on KERNEL_SHAPES,
#           L2 cold (KERNELS_S, 200 s; KERNEL_BATCHES, 1,8: add 128 for prefill rows, where int4 / int8 sparse
#           variants run session 18's GEMM over M tiles against dequant+mm, what the eager path did before);
#   decode  whole-model greedy decode tok/s of the Llama-3.2-1B-shaped zoo model in bf16 under CUDA graphs:
#           eager, then DECODE_CONFIGS (effcompile configs ~35-45 s each in sessions 10 and 13, less since session 16's
#           compile-time cuts, never timed on a GPU; TorchAO's kernels
#           without Inductor a few seconds): int4, and int4 launched without programmatic dependent launch
#           (no-pdl:, session 15's untimed change); 50 % thresholds, with and without PDL ('none' runs its
#           linears in cuBLAS, which PDL does not reach: the no-pdl row shows how much of the thresholds' gain
#           over it is PDL's); 'none', effcompile's dense bf16, the baseline thresholds are held to; int4 with
#           session 15's decode attention kernel instead of SDPA (GroupedQueryAttention(decode_kernel=True));
#           thresholds x int4; TorchAO's int4; last, int4 with the LM head and
#           its TorchAO peer ($ABLATION, int4 without the launch-cutting passes, ran in session 13: 690 against
#           872 tok/s at batch 1) (275 s);
#           DECODE_MODEL=llama-8b times Llama-3.1-8B's shape instead (16 GB in bf16, never run yet: expect
#           fewer configs to fit; DECODE_BATCHES=1 builds one decode graph per config, not two), where weight reads
#           dominate a step as in the papers' headline numbers;
#           each row checks its first decode step's logits against eager's (logits_vs_eager_b*); DECODE_S;
#           DECODE_PREFILL=1 also times each config's compiled prefill of 2 x 64 tokens (prefill_ms; a fused
#           quantized sparse linear dequantizes its whole weight per prefill call on a GPU, never measured);
#           DECODE_CALIB=1 calibrates thresholds on one random batch instead of 4 (speed only: session 18's 8B
#           thresholds config spent 65 s of its 114 s calibrating);
#           DECODE_CACHE_LEN=4096 allocates the static KV cache that long (as a server would), where SDPA reads
#           all of it every step and the decode attention kernel only the positions written so far;
#   peers   TorchAO int4 and the bf16 model under torch.compile, compiled by region (PEERS_S, default 280 s;
#           PEER_BATCHES, default 1,8): a whole compiled model did not finish within 165-210 s in sessions 7
#           and 10, nor TorchAO int4 compiled per layer within 200 s in session 13 (dynamo traced each of the
#           16 layers again per batch size: HF indexes its cache by the int layer_idx, which it specializes).
#           Now the layers share one graph per batch size (bench.peers.compile_regions hands each its own
#           cache layer; llama-base on the CPU: ~10 s per batch size). Rows are written per batch size.
#           PEER_MODEL=llama-8b: against session 18's 8B rows (#5's compiled-TorchAO comparison, never run).
#   pdlcheck  the GPU lane's programmatic-dependent-launch tests (a chain of dependent GEMVs replayed from a CUDA
#           graph, and a thresholded decode step captured in one; ~1 min with compiles): if they fail, the steps
#           after it run with EFFCOMPILE_PDL=0 (effcompile's kernels launched as before session 15), and say so.
# Each step has its own time limit and writes under $OUT (default benchmarks/results/gpu-quick) as it goes,
# so a step stopped by its limit keeps what it measured and the next step still runs. TorchAO comes from
# wheels in .whl/ when they are there (the device image has none): carry .whl.
#
#   OUT=$OUT benchmarks/gpu_quick.sh                                  # on the device machine, repo root
#   STEPS=pdlcheck,kernels,decode OUT=$OUT benchmarks/gpu_quick.sh    # ~560 s; then at once, still warm:
#   STEPS=tests,peers PEERS_S=200 OUT=$OUT benchmarks/gpu_quick.sh
# With #6's decode target in view (reachable only on the 8B shape), the 8B decode in the first call instead:
#   STEPS=pdlcheck,kernels,decode PDLCHECK_S=60 SWEEP_S=120 KERNELS_S=200 DECODE_S=300 DECODE_MODEL=llama-8b \
#     DECODE_BATCHES=1 DECODE_CONFIGS="none;threshold(sparsity=0.5);..." OUT=$OUT benchmarks/gpu_quick.sh
# Then, here: benchmarks/compare.py <last session's kernels / decode JSON> <this run's> (same card only).
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
STEPS=${STEPS:-tests,kernels,decode}
tests() {
    # The whole log too: session 13's tail showed 19 failures but not the first, a device assert that poisoned
    # the rest of its worker's tests.
    timeout -s INT "${TESTS_S:-170}" "$PY" -m pytest -q -rf -m gpu -n 16 -p no:cacheprovider tests/gpu \
        ${TESTS_K:+-k "$TESTS_K"} --junitxml="$OUT/gpu-tests.xml" 2>&1 \
        | grep -v "Benchmark\|IndexKernel.cu" | tee "$OUT/gpu-tests-full.log" | tail -40 | tee "$OUT/gpu-tests.log"
}
pdlcheck() {
    timeout "${PDLCHECK_S:-150}" "$PY" -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/gpu \
        -k "dependent_kernel_chain or (compiled_decode_stays_on_device and not int4 and not int8)" 2>&1 | tail -15 \
        | tee "$OUT/pdlcheck.log"
    # pytest's summary line, e.g. "5 passed in 41.2s" (not "1 failed, 4 passed", "4 skipped", nor a timeout's nothing)
    summary=$(grep -E " in [0-9.]+s" "$OUT/pdlcheck.log" | tail -1)
    if [[ $summary == *" passed"* && $summary != *failed* && $summary != *error* && $summary != *skipped* ]]; then
        echo "gpu_quick: PDL checks passed; kernels launch with PDL" | tee -a "$OUT/pdlcheck.log"
    else
        export EFFCOMPILE_PDL=0
        echo "gpu_quick: PDL checks failed or timed out: EFFCOMPILE_PDL=0 for the steps after this one" | tee -a "$OUT/pdlcheck.log"
    fi
}
kernels() {
    timeout "${KERNELS_S:-200}" "$PY" benchmarks/kernels.py --device cuda --sweep --sweep-budget-s "${SWEEP_S:-110}" \
        --tuning-out "$OUT/tuning.json" --sweep-batches "${SWEEP_BATCHES:-1,8}" \
        --sweep-cases "${SWEEP_CASES:-sparse/int4/m1,dequant/int4/m1,sparse/float/m1,dequant/int4/m8,sparse/int8/m1,dequant/int8/m1}" \
        --sweep-shapes "${SWEEP_SHAPES:-8b.up,8b.down,1b.qkv,1b.o,1b.gate_up,1b.down}" \
        --shapes "${KERNEL_SHAPES:-8b.up,8b.down,1b.gate_up,1b.o}" --batches "${KERNEL_BATCHES:-1,8}" --output "$OUT/kernels.json" 2>&1 | grep -v "^  config" | tee "$OUT/kernels.log"
}
# int4 without session 11's launch cuts (additive mask once, one-kernel cache writes, one RoPE for q and k),
# session 12's gated epilogue nor session 10's GQA: the same run then shows what they saved. Last, so a timeout
# cuts it first.
INT4="quantize(weights=int4,group_size=128)"
INT4_HEAD="quantize(weights=int4,group_size=128,targets=(attn,ffn,head))"  # and TorchAO's -head peer: the same weights
ABLATION="quantize(weights=int4,group_size=128)+additive_attention_mask(enabled=False)+fuse_cache_writes(enabled=False)+fuse_rotary_qk(enabled=False)+fuse_gated_activation(enabled=False)+grouped_query_attention(enabled=False)"
decode() {  # with the tile table the kernels step wrote (if it ran and got that far) over the shipped one
    [ -s "$OUT/tuning.json" ] && export EFFCOMPILE_KERNEL_TUNING="$OUT/tuning.json"
    timeout "${DECODE_S:-275}" "$PY" benchmarks/decode.py --device cuda --dtype bfloat16 --model "${DECODE_MODEL:-llama-1b}" --steps 16 \
        --batches "${DECODE_BATCHES:-1,8}" \
        ${DECODE_CACHE_LEN:+--cache-len "$DECODE_CACHE_LEN"} ${DECODE_PREFILL:+--prefill} \
        ${DECODE_CALIB:+--calib-batches "$DECODE_CALIB"} \
        --configs "${DECODE_CONFIGS:-$INT4;no-pdl:$INT4;threshold(sparsity=0.5);no-pdl:threshold(sparsity=0.5);none;grouped_query_attention(decode_kernel=True)+$INT4;threshold(sparsity=0.5)+$INT4;torchao-int4-eager;$INT4_HEAD;torchao-int4-eager-head}" \
        --out "$OUT/decode.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tee "$OUT/decode.log"
}
peers() {
    timeout "${PEERS_S:-280}" "$PY" benchmarks/decode.py --device cuda --dtype bfloat16 --model "${PEER_MODEL:-llama-1b}" --steps 16 \
        --batches "${PEER_BATCHES:-1,8}" --configs "${PEER_CONFIGS:-torchao-int4-regional;torch.compile-regional}" --out "$OUT/decode-peers.json" 2>&1 \
        | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tee "$OUT/decode-peers.log"
}
for step in ${STEPS//,/ }; do
    case $step in
        pdlcheck|tests|kernels|decode|peers) "$step" ;;
        *) echo "gpu_quick: unknown step $step (pdlcheck, tests, kernels, decode, peers)"; exit 2 ;;
    esac
done
echo "gpu_quick: done; results in $OUT"
