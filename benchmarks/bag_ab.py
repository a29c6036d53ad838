"""A/B of CPU bag-GEMV settings on whole-model decode, in one process: compile once, alternate the settings.

cpu_bag_gemv's tuning knobs (BAG_INPUTS, FLOAT_BAG_MAX_KEPT, ROW_SPLIT_MIN_WEIGHTS, ...) are module globals its op
reads on every call, so one compiled model can be timed under each variant in turn, with eager timed in the same
rounds: alternating in one process removes the compile-to-compile and process-to-process noise a two-checkout A/B
has (~10-15 % on the 2-core box). Prints one JSON line (tok/s per round, per variant and eager); --out also writes it
with the medians, their ratios to eager and the versions (benchmarks/results/cpu-bag-*-ab-*.json hold such runs).

    python benchmarks/bag_ab.py "threshold(sparsity=0.5)" '{"new": {"BAG_INPUTS": 32}, "old": {"BAG_INPUTS": 1073741824}}'

A variant may also carry its own pass config under "spec" (compiled separately), to A/B two configs:

    python benchmarks/bag_ab.py "threshold(sparsity=0.5)" '{"blocks": {}, "head": {"spec": "threshold(sparsity=0.5,targets=(all,head))"}}'
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

import effcompile as ec
from effcompile.bench import spec as pass_spec
from effcompile.bench import timing, zoo
from effcompile.codegen.kernels import cpu_bag_gemv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help='pass config, as benchmarks/decode.py takes it: "threshold(sparsity=0.5)"')
    ap.add_argument("variants", help='JSON: {name: {cpu_bag_gemv global: value}}')
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", type=Path, help="also write the run, with medians, to this JSON file")
    ap.add_argument("--compile-each", action="store_true",
                    help="compile one model per variant with its knobs set (for knobs lowering reads, e.g. INT8_KERNEL)")
    a = ap.parse_args()
    variants = json.loads(a.variants)
    specs = {name: knobs.pop("spec", a.spec) for name, knobs in variants.items()}
    for name, knobs in variants.items():
        for knob in knobs:
            if not hasattr(cpu_bag_gemv, knob):
                raise ValueError(f"variant {name!r}: cpu_bag_gemv has no {knob!r}")
    # Every compiled variant adds its own dynamo cache entries (prefill, decode) to the one forward's: past the
    # default limit of 8 the later variants would run eagerly (effcompile warns).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * (len(variants) + 1))
    zm = zoo.get_model(a.model, device="cpu", dtype=getattr(torch, a.dtype))
    model = zm.model.eval()
    calib = [zm.make_inputs(batch=2, seq=64, seed=0)]
    prompt = zm.make_inputs(batch=a.batch, seq=32, seed=101)["input_ids"]
    tok_s: dict[str, list[float]] = {name: [] for name in [*variants, "eager"]}
    fast = {}
    with torch.no_grad():
        for name, knobs in variants.items():
            for knob, value in knobs.items():
                setattr(cpu_bag_gemv, knob, value)
            same = next((f for n, f in fast.items() if specs[n] == specs[name]), None)
            if a.compile_each or same is None:
                passes = pass_spec.parse_passes(specs[name])[1]
                fast[name] = ec.effcompile(model, passes=passes, calibration=calib, cache=False)
                fast[name](**calib[0])  # compiles
            else:
                fast[name] = same
        for _ in range(a.rounds):
            for name, knobs in variants.items():
                for knob, value in knobs.items():
                    setattr(cpu_bag_gemv, knob, value)
                speed = timing.decode_speed(fast[name], model, prompt, a.steps, 3, "cpu")
                tok_s[name].append(round(speed["tokens_per_s"], 2))
            tok_s["eager"].append(round(timing.decode_speed(model, model, prompt, a.steps, 3, "cpu")["tokens_per_s"], 2))
    # a variant dynamo ran eagerly (or with a graph left to torch) would time as something it is not: keep the record
    fallbacks = {name: [str(f) for f in ec.explain(f).fallbacks] for name, f in fast.items()}
    run = {"spec": a.spec, "specs": specs, "fallbacks": fallbacks, "model": a.model, "dtype": a.dtype, "batch": a.batch, "variants": variants,
           "compile_each": a.compile_each, "tok_s": tok_s}
    print(json.dumps(run), flush=True)
    if a.out:
        med = {name: statistics.median(v) for name, v in tok_s.items()}
        a.out.write_text(json.dumps({
            "benchmark": "bag_ab", **run, "rounds": a.rounds, "steps": a.steps, "median_tok_s": med,
            "median_vs_eager": {name: round(m / med["eager"], 3) for name, m in med.items() if name != "eager"},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "calibration": "1 random batch of 2 x 64 tokens"}, indent=1))


if __name__ == "__main__":
    main()
