"""Kernel launches per decode step (no GPU): eager vs effcompile configs, counted with the torch profiler.

At batch-1 decode most of a step is small kernels, not weight reads (session 7, H100: the eager Llama-1B
step read ~2 GB in 2.69 ms, ~750 GB/s), so the launches a step issues bound its speed as much as the GEMV
kernels do. The model runs on the CPU under TRITON_INTERPRET=1, so effcompile lowers exactly as it would
on a GPU (the same generated Triton kernels and custom ops). A launch is an ``effcompile::`` custom op, or
an ``aten::`` op that computes (views, allocations and metadata ops are not counted); nothing inside a
custom op is counted, since under the interpreter its insides are Python, not kernels. Eager torch ops
each launch at least one kernel on a GPU, and some more than one: a lower bound there.

    python benchmarks/launches.py --model llama-small --out benchmarks/results/launches-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import effcompile as ec  # noqa: E402
from effcompile.bench import spec as pass_spec  # noqa: E402
from effcompile.bench import timing, zoo  # noqa: E402

# effcompile ops that are one of our Triton kernels on a GPU, so launched with programmatic dependent launch on
# Hopper (codegen/ops.py launch_options): generated row kernels (counted by kind) and the hand-written ones.
# gqa_attention runs SDPA, bag_linear is the CPU path: not ours on a GPU.
PDL_KERNELS = {"effcompile::pointwise", "effcompile::reduction", "effcompile::epilogue", "effcompile::dequant_linear",
               "effcompile::sparse_gemv", "effcompile::cache_write", "effcompile::rope_cache_write"}
CONFIGS = ["none", "quantize(weights=int4,group_size=32)", "quantize(weights=int8)", "threshold(sparsity=0.5)"]
_NOT_A_KERNEL = {
    "as_strided", "view", "resolve_conj", "resolve_neg", "empty", "empty_strided", "_unsafe_view", "result_type",
    "alias", "resize_", "t", "transpose", "unsqueeze", "squeeze", "expand", "reshape", "slice", "select",
    "permute", "contiguous", "to", "detach", "lift_fresh", "scalar_tensor", "item", "_local_scalar_dense",
    "_reshape_alias", "unflatten", "flatten", "split", "chunk", "narrow", "expand_as", "view_as", "_to_copy",
    "lift_fresh_copy", "is_nonzero", "unbind", "split_with_sizes", "empty_like",
}


def _computes(name: str) -> bool:
    return name.startswith("aten::") and name.split("::")[1] not in _NOT_A_KERNEL


def count_launches(events) -> Counter:
    """Launching ops of one profiled step: custom ops whole, aten ops with no computing op below them."""
    inside: set[int] = set()
    for e in events:
        if e.name.startswith("effcompile::"):
            stack = list(e.cpu_children)
            while stack:
                x = stack.pop()
                inside.add(id(x))
                stack.extend(x.cpu_children)
    launches: Counter = Counter()
    for e in events:
        if id(e) in inside:
            continue
        if e.name.startswith("effcompile::"):
            generated = any(f"::{kind}_" in e.name for kind in ("pointwise", "reduction", "epilogue"))
            launches[e.name.split("_")[0] if generated else e.name] += 1
            continue
        if not _computes(e.name):
            continue
        stack, below = list(e.cpu_children), False
        while stack and not below:
            x = stack.pop()
            below = _computes(x.name) or x.name.startswith("effcompile::")
            stack.extend(x.cpu_children)
        if not below:
            launches[e.name] += 1
    return launches


def step_launches(fn, model, batch: int, zm) -> Counter:
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    ids = zm.make_inputs(batch=batch, seq=8, seed=batch)["input_ids"]
    cache = StaticCache(config=model.config, max_cache_len=32)
    kw = timing.cache_kwarg(model)
    with torch.no_grad():
        tok = model(input_ids=ids, **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        pos = torch.tensor([ids.shape[1]])
        for _ in range(2):  # compile and warm up
            fn(input_ids=tok, **{kw: cache}, use_cache=True, cache_position=pos)
            pos += 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(input_ids=tok, **{kw: cache}, use_cache=True, cache_position=pos)
    return count_launches(prof.events())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--configs", default=";".join(CONFIGS))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    zm = zoo.get_model(a.model, device="cpu", dtype=torch.float32)
    model = zm.model.eval()
    layers = model.config.num_hidden_layers
    rows = []
    variants = [("eager", None)] + [(spec, spec) for spec in a.configs.split(";")]
    variants += [(f"{spec} [FuseParallelLinears off]", spec) for spec in a.configs.split(";")
                 if "quantize" in spec or "threshold" in spec]
    for label, spec in variants:
        row = {"config": label}
        for b in map(int, a.batches.split(",")):
            torch._dynamo.reset()
            if spec is None:
                fn = model
            else:
                passes = pass_spec.parse_passes(spec)[1] if spec != "none" else []
                if "off" in label:
                    from effcompile.passes.fuse_parallel_linears import FuseParallelLinears

                    passes = [*passes, FuseParallelLinears(enabled=False)]
                # Thresholds calibrate: on random-token batches, through a compiled prefill as decode.py does
                # (the decode graphs then reuse what it calibrated).
                calib = [zm.make_inputs(batch=2, seq=16, seed=s) for s in range(2)] if "threshold" in spec else None
                fn = ec.effcompile(model, passes=passes, calibration=calib, cache=False)
                if calib:
                    with torch.no_grad():
                        fn(**calib[0])
            launches = step_launches(fn, model, b, zm)
            row[f"launches_b{b}"] = sum(launches.values())
            row[f"pdl_kernels_b{b}"] = sum(n for op, n in launches.items() if op in PDL_KERNELS)
            row[f"per_layer_b{b}"] = round(sum(launches.values()) / layers, 1)
            row[f"by_op_b{b}"] = dict(launches.most_common())
        rows.append(row)
        print(label, {k: v for k, v in row.items() if k.startswith(("launches", "per_layer", "pdl"))}, flush=True)
    if a.out:
        a.out.write_text(json.dumps({
            "benchmark": "launches per decode step", "model": a.model, "layers": layers,
            "how": "torch profiler on CPU, TRITON_INTERPRET=1 (effcompile lowers as on a GPU); see the docstring",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
