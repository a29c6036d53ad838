"""CPU greedy-decode tokens/s of a Llama-style model under quantization and channel-thresholding passes vs eager.

Speed only: the model is the zoo's random-init ``llama-base`` (768 hidden, 12 layers, 32k vocab,
~110 M parameters), big enough that a decode step is bound by reading its weights; quality of these
passes is measured on real weights elsewhere (benchmarks/quantize.py, thresholding.py). Each config is
compiled with effcompile (calibration: 4 random-token batches for the thresholds), then timed with the
harness's static-KV-cache decode loop (effcompile.bench.timing.decode_speed) at batch 1 and 8; eager is
timed first and last so drift shows. Writes benchmarks/results/cpu-decode-<model>-<date>.json.

    python benchmarks/cpu_decode.py [--model llama-base] [--steps 16]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
from pathlib import Path

import torch

import effcompile as ec
from effcompile.bench import spec as pass_spec
from effcompile.bench import timing, zoo
from effcompile.codegen import ops as cg_ops

CONFIGS = ["none", "quantize(weights=int8)", "quantize(weights=int4,group_size=128)",
           "threshold(sparsity=0.4)", "threshold(sparsity=0.5)",
           "threshold(sparsity=0.5)+quantize(weights=int8)",
           "threshold(sparsity=0.5)+quantize(weights=int4,group_size=128)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-base")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated pass specs")
    ap.add_argument("--out", type=Path, help="result file (default results/cpu-decode-<model>-<date>.json)")
    a = ap.parse_args()
    zm = zoo.get_model(a.model)
    model = zm.model.eval()
    calib = [zm.make_inputs(batch=2, seq=64, seed=s) for s in range(4)]
    batches = [int(b) for b in a.batches.split(",")]
    prompts = {b: zm.make_inputs(batch=b, seq=32, seed=100 + b)["input_ids"] for b in batches}

    def decode(fn, b):
        with torch.no_grad():
            return timing.decode_speed(fn, model, prompts[b], a.steps, 3, "cpu")["tokens_per_s"]

    rows = [{"config": "eager (first)", **{f"tok_s_b{b}": round(decode(model, b), 2) for b in batches}}]
    print(rows[-1], flush=True)
    for spec in a.configs.split(";"):
        passes = pass_spec.parse_passes(spec)[1] if spec != "none" else []
        # Every config compiles the same forward: without a reset dynamo's per-code recompile limit
        # runs out after a few configs and the rest would silently run eager.
        torch._dynamo.reset()
        fast = ec.effcompile(model, passes=passes, calibration=calib if passes else None, cache=False)
        with torch.no_grad():  # a compiled prefill first: decode graphs reuse the thresholds it calibrates
            fast(**calib[0])
        before = dict(cg_ops.PATH_COUNTS.get("bag_linear", {}))
        row = {"config": spec, **{f"tok_s_b{b}": round(decode(fast, b), 2) for b in batches}}
        after = cg_ops.PATH_COUNTS.get("bag_linear", {})
        row["bag_calls"] = {k: after[k] - before.get(k, 0) for k in after}
        rep = ec.explain(fast)
        row["fallbacks"] = rep.fallbacks
        row["kernels"] = sorted({f"{k.name}:{k.kind}" for k in rep.kernels if k.ops and
                                 k.ops[0] in ("wq_linear", "sparse_linear")})
        rows.append(row)
        print(row, flush=True)
        # Free this config before the next one compiles: a 1B model's sparse layout is another full copy
        # of the weights, and glibc keeps freed arenas unless trimmed (llama-1b ran out of 24 GB without).
        del fast, rep
        gc.collect()
        timing._trim_heap()
    rows.append({"config": "eager (last)", **{f"tok_s_b{b}": round(decode(model, b), 2) for b in batches}})
    print(rows[-1], flush=True)
    base = {b: (rows[0][f"tok_s_b{b}"] + rows[-1][f"tok_s_b{b}"]) / 2 for b in batches}
    for r in rows[1:-1]:
        r.update({f"vs_eager_b{b}": round(r[f"tok_s_b{b}"] / base[b], 3) for b in batches})
    out = a.out or Path(__file__).parent / "results" / f"cpu-decode-{a.model}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"benchmark": "cpu_decode", "model": a.model, "steps": a.steps,
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "date": datetime.date.today().isoformat(), "machine": "2-core CPU dev box",
                               "load_avg_at_start": os.getloadavg(), "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
