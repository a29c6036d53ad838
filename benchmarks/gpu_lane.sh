#!/usr/bin/env bash
# GPU lane: `pytest -m gpu`, benchmarks/kernels.py (tile sweep + GB/s vs cuBLAS / TorchAO),
# benchmarks/spine.py and `effcompile bench` on the zoo (dense + a quantize
# sweep) on a CUDA machine, all collected into benchmarks/results/<device>-<date>.json (+ Pareto PNGs).
#
#   benchmarks/gpu_lane.sh
#
# Environment (defaults below): PYTHON, LANE_MODELS (dense runs, "name[:dtype]"), LANE_SWEEP_MODELS,
# LANE_SWEEP (the grid), LANE_REPS, LANE_KERNEL_SWEEP (0: time the kernels at their tuned/default tiles
# without sweeping every tile shape first). Inductor compiles dominate the time: trim LANE_MODELS to fit
# a budget. A short profile (never timed end to end; the gpu tests alone took 74 s on an H200):
#   LANE_MODELS="llama-1b:bfloat16" LANE_SWEEP_MODELS="" LANE_KERNEL_SWEEP=0 LANE_REPS=10 benchmarks/gpu_lane.sh
# stdlib-lm is measured only when a trained copy is found: this Python's cache, or EFFCOMPILE_STDLIB_LM
# pointing at a carried directory (trained on another Python's stdlib; verified, never retrained).
# A failing step does not stop the lane; it is recorded as failed in the results file.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python}
LANE_MODELS=${LANE_MODELS:-"minilm stdlib-lm llama-small gpt2-small bert-small vit-small llama-1b:bfloat16"}
LANE_SWEEP_MODELS=${LANE_SWEEP_MODELS-"minilm llama-1b:bfloat16"}
LANE_SWEEP=${LANE_SWEEP:-"quantize(weights=[int8,int4],group_size=[None,32,64,128])"}
LANE_REPS=${LANE_REPS:-20}
LANE_KERNEL_SWEEP=${LANE_KERNEL_SWEEP:-1}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_lane: no CUDA device visible to torch; this lane only runs on a GPU machine" >&2
    exit 2
fi

RESULTS=benchmarks/results
mkdir -p "$RESULTS"
NAME=$("$PY" -m effcompile.bench.lane --print-name)   # <device>-<date>.json, fixed at the start
STEM=${NAME%.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-lane.XXXXXX")
BENCH="$WORK/bench.jsonl"
STEPS=()
PLOTS=()

# step NAME CMD...: run, show the output, remember the exit status and log for the results file.
step() {
    local name=$1
    shift
    echo "== gpu_lane: $name: $*" >&2
    "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    STEPS+=(--step "$name=$rc:$WORK/$name.log")
}

# The stdlib LM trains on first use (minutes of CPU): the lane only measures it when already cached.
have_model() {
    [ "$1" != "stdlib-lm" ] && return 0
    "$PY" -c "from effcompile.bench.zoo import load_stdlib_lm; load_stdlib_lm(train_if_missing=False)" >/dev/null 2>&1
}

# pytest exits 5 when nothing is collected: no gpu-marked tests is not a failed lane.
gpu_tests() {
    "$PY" -m pytest -q -m gpu -p no:cacheprovider
    local rc=$?
    if [ "$rc" -eq 5 ]; then echo "gpu_lane: no gpu-marked tests collected"; return 0; fi
    return "$rc"
}

step gpu-tests gpu_tests
# Kernels first: the tile sweep writes this GPU's tuning table, which every later step then uses.
SWEEP_ARGS=(--sweep --tuning-out "$WORK/tuning.json")
[ "$LANE_KERNEL_SWEEP" = 0 ] && SWEEP_ARGS=()
step kernels "$PY" benchmarks/kernels.py --device cuda "${SWEEP_ARGS[@]}" --output "$RESULTS/$STEM-kernels.json"
[ -f "$WORK/tuning.json" ] && export EFFCOMPILE_KERNEL_TUNING="$WORK/tuning.json"
step spine "$PY" benchmarks/spine.py --device cuda --reps "$LANE_REPS" --output "$WORK/spine.json"

for spec in $LANE_MODELS; do
    model=${spec%%:*}; dtype=float32; [ "$spec" != "$model" ] && dtype=${spec#*:}
    if ! have_model "$model"; then STEPS+=(--step "bench-$model=skip:not cached (train it first)"); continue; fi
    step "bench-$model" "$PY" -m effcompile.cli bench --model "$model" --device cuda --dtype "$dtype" \
        --reps "$LANE_REPS" --output "$BENCH" --quiet
done

for spec in $LANE_SWEEP_MODELS; do
    model=${spec%%:*}; dtype=float32; [ "$spec" != "$model" ] && dtype=${spec#*:}
    if ! have_model "$model"; then STEPS+=(--step "sweep-$model=skip:not cached (train it first)"); continue; fi
    plot="$RESULTS/$STEM-pareto-$model.png"
    step "sweep-$model" "$PY" -m effcompile.cli bench --model "$model" --device cuda --dtype "$dtype" \
        --reps "$LANE_REPS" --sweep "$LANE_SWEEP" --output "$BENCH" --plot "$plot" --quiet
    PLOTS+=(--plot "$plot")
done

"$PY" -m effcompile.bench.lane --results-dir "$RESULTS" --name "$NAME" "${STEPS[@]}" \
    --spine "$WORK/spine.json" --bench "$BENCH" "${PLOTS[@]}"
rc=$?
echo "gpu_lane: logs in $WORK" >&2
exit $rc
