"""CPU: what leaving row-op groups as torch ops (no custom-op wrapper) buys, interleaved in one process.

Three variants of the same model, timed round-robin so machine drift hits them alike:
eager; effcompile as it lowers on CPU now (row ops left to torch); effcompile with ``use_triton=False``,
which still wraps every row-op group in a generated custom op that runs its torch reference (what
CPU lowering did before). llama-base (random init, 110 M) decode tok/s at batch 1 with a static KV
cache, and MiniLM-L6 (real weights) latency on 8 real texts (the zoo batch: padded to the longest, <= 128). Writes benchmarks/results/cpu-dispatch-<date>.json.

    python benchmarks/cpu_dispatch.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

import effcompile as ec
from effcompile.bench import timing, zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per llama-base measurement")
    a = ap.parse_args()
    load_at_start = os.getloadavg()
    results = {}

    lm = zoo.get_model("llama-base")
    prompt = lm.make_inputs(batch=1, seq=32, seed=101)["input_ids"]
    variants = {"eager": lm.model, "effcompile": ec.effcompile(lm.model, cache=False),
                "effcompile, row ops wrapped (use_triton=False)": ec.effcompile(lm.model, cache=False, use_triton=False)}
    tok_s = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(a.rounds + 1):  # the first round warms up (compiles) and is dropped
            for k, fn in variants.items():
                tok_s[k].append(timing.decode_speed(fn, lm.model, prompt, a.steps, 2, "cpu")["tokens_per_s"])
    results["llama-base decode b1 tok/s"] = {k: {"median": statistics.median(v[1:]), "all": v[1:]}
                                             for k, v in tok_s.items()}

    mini = zoo.get_model("minilm")
    batch = mini.make_inputs(batch=8, seq=128, seed=0)
    variants = {"eager": mini.model, "effcompile": ec.effcompile(mini.model, cache=False),
                "effcompile, row ops wrapped (use_triton=False)": ec.effcompile(mini.model, cache=False, use_triton=False)}
    ms = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():
            f(**batch)
        for _ in range(a.rounds * 2):
            for k, f in variants.items():
                t = time.perf_counter()
                f(**batch)
                ms[k].append((time.perf_counter() - t) * 1e3)
    results["minilm 8x128 ms"] = {k: {"median": statistics.median(v), "all": v} for k, v in ms.items()}

    for name, r in results.items():
        print(name, {k: round(v["median"], 2) for k, v in r.items()})
    day = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"cpu-dispatch-{day}.json"
    out.write_text(json.dumps({"benchmark": "cpu_dispatch", "date": day, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "machine": "2-core CPU dev box",
                               "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(),
                               "results": results}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
