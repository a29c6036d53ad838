"""CPU speed of decode-shaped linears: dense fp32 vs effcompile's embedding-bag GEMV, dense and sparse, float/int8/int4.

Llama-7B projections (4096 -> 11008, 11008 -> 4096), fp32 activations (--dtype: bf16 / fp16 activations and float
weights), 1 and 8 rows (--rows). Per weight format:
  fp32_ms     dense F.linear with the float weight, in --dtype (the baseline every ratio is against)
  packed_ms   the format's previous CPU path (torch's packed int8/int4 ops: wq_linear_eager)
  gather_ms   the row-gather sparse path (sparse_linear_eager) at the same sparsity
  bag_ms      the embedding-bag GEMV codegen lowers sparse_linear / wq_linear to on CPU
  kernel_ms   int4: the C kernel (cpu_int4_gemv) codegen lowers an int4 sparse_linear to on CPU; float / int8, 1-8 rows:
              bag_linear with its C kernel (cpu_float_gemv), where bag_ms is then what runs without it (torch's
              float / byte bag, or past its rows the dense matmul of the input-major weight)
at 0/25/40/50/60 % activation sparsity (thresholds = quantiles of |x|). Median of --reps calls.
Writes benchmarks/results/sparse-cpu-<date>.json.

Without --stream every call reads the same weight, which a large last-level cache keeps (this box has 480 MB of L3:
the 7B projections fit), so the ratios are cache-resident. --stream gives each call the next of enough copies of
the weights to fill twice the last-level cache, so every call reads them from DRAM as a model's decode step does
(session 22: there the float bag streamed at ~20 GB/s against sgemv's ~28); it skips the slow gather column.
--shapes 1b times Llama-3.2-1B's four decode GEMVs instead of the 7B projections. A float bag_ms is the dense
matmul where a call keeps more than cpu_bag_gemv.FLOAT_BAG_MAX_KEPT of its inputs (fp32, as shipped); --raw-bags lifts
that limit so every float row times the bag itself (sparse-cpu-1b-stream-2026-11-28-s23.json ran so).

    python benchmarks/sparse_cpu.py [--reps 20] [--stream] [--shapes 7b|1b|small] [--weights float,int8,int4] [--raw-bags]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from quantize import median_ms  # benchmarks/quantize.py: warm-up + median, no grad

from effcompile.codegen.kernels import cpu_bag_gemv as bag
from effcompile.codegen.kernels import cpu_int4_gemv as int4_gemv
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl

SHAPE_SETS = {"7b": {"7b.up": (11008, 4096), "7b.down": (4096, 11008)},
              "1b": {"1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192)},
              # MiniLM-L6 (384 wide, ffn 1536) and the stdlib LM (256 wide, ffn 704; head 4096 x 256): weights under
              # cpu_bag_gemv.FLOAT_BAG_MIN_WEIGHTS, which bag_linear runs dense (kernel_ms: its C kernel regardless)
              "small": {"minilm.qkv": (1152, 384), "minilm.o": (384, 384), "minilm.up": (1536, 384),
                        "minilm.down": (384, 1536), "lm.gate_up": (1408, 256), "lm.down": (256, 704),
                        "lm.head": (4096, 256)}}
SPARSITY = (0.0, 0.25, 0.4, 0.5, 0.6)


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 64 MB when it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=64 << 20)


def copies_of(tensors, llc: int, stream: bool) -> list[tuple]:
    """[tensors], or with stream enough clones of them (together) to fill twice the last-level cache: timed in turn
    (timed_ms), each copy is evicted from the cache between its uses."""
    if not stream:
        return [tensors]
    size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    n = max(2, math.ceil(2 * llc / max(size, 1)))
    return [tensors] + [tuple(t.clone() if t is not None else None for t in tensors) for _ in range(n - 1)]


def timed_ms(fn, copies: list[tuple], reps: int) -> float:
    """median_ms of fn(*copy), the copies taken in turn; each copy is called once first, so a layout a path builds
    and caches per weight on first use (the packed int4 kernel's) is not what gets timed."""
    for c in copies[1:]:
        fn(*c)
    turn = itertools.cycle(copies)
    return median_ms(lambda: fn(*next(turn)), reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--stream", action="store_true", help="weights from DRAM on every call (copies fill 2x the LLC)")
    ap.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="7b")
    ap.add_argument("--weights", default="float,int8,int4", help="comma-separated weight formats to time")
    ap.add_argument("--raw-bags", action="store_true", help="float bags at every sparsity (no FLOAT_BAG_MAX_KEPT)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="activations and float weights (fp32_ms is then the dense F.linear in this dtype)")
    ap.add_argument("--rows", default="1,8", help="comma-separated activation rows to time")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.raw_bags:
        bag.FLOAT_BAG_MAX_KEPT = float("inf")
    llc = last_level_cache_bytes()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPE_SETS[a.shapes].items():
        w = torch.randn(n, k, generator=gen) / k**0.5
        formats = {"float": (w.to(dtype), None, None, 0)}
        for fmt, g in (("int8", 0), ("int4", 128)):
            qw = qops.quantize_weight(w, fmt, g)
            formats[fmt] = (qw.qweight, qw.scales, qw.zeros, g)
        ws = copies_of((w.to(dtype),), llc, a.stream)
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, generator=gen).to(dtype)
            fp32 = timed_ms(lambda w, x=x: F.linear(x, w), ws, a.reps)
            for fmt, (q, s, z, g) in formats.items():
                if fmt not in a.weights.split(","):
                    continue
                qs = copies_of((q, s, z), llc, a.stream)
                packed = None if fmt == "float" else timed_ms(
                    lambda q, s, z, x=x, g=g, fmt=fmt: qops.wq_linear_eager(x, q, s, z, None, fmt, g), qs, a.reps)
                wt, st, zt = sl.to_input_major(q, s, z, fmt, g)
                bags = copies_of((bag.pack(wt, fmt), st, zt), llc, a.stream)
                kernel = fmt == "int4" and int4_gemv.unavailable() is None
                panels = copies_of(int4_gemv.pack(wt, st, zt), llc, a.stream) if kernel else None
                for sp in SPARSITY:
                    t = torch.quantile(x.abs().flatten().float(), sp) if sp else torch.tensor(0.0)
                    run_bag = lambda r, st, zt, x=x, t=t, g=g, fmt=fmt: bag.run(x, t, r, st, zt, None, fmt, g, "bench",
                                                                                 False)
                    row_kernel = bag.row_kernel(fmt, bags[0][0].dtype, m)
                    bag.FLOAT_KERNEL = bag.INT8_KERNEL = False  # bag_ms: torch's bag, as where no C compiler is
                    bag_ms = timed_ms(run_bag, bags, a.reps)
                    bag.FLOAT_KERNEL = bag.INT8_KERNEL = True
                    min_weights, bag.FLOAT_BAG_MIN_WEIGHTS = bag.FLOAT_BAG_MIN_WEIGHTS, 0  # kernel_ms: the kernel at any size
                    gather = None if a.stream else median_ms(
                        lambda x=x, t=t, wt=wt, st=st, zt=zt, g=g, fmt=fmt:
                        sl.sparse_linear_eager(x, t, wt, st, zt, None, fmt, g, "bench", False), a.reps)
                    kernel_ms = timed_ms(
                        lambda p, sz, x=x, t=t, g=g, n=n: int4_gemv.run(x, t, p, sz, None, n, g, "bench", False),
                        panels, a.reps) if kernel else timed_ms(run_bag, bags, a.reps) if row_kernel else None
                    bag.FLOAT_BAG_MIN_WEIGHTS = min_weights
                    needed = float((x.abs() > t).any(0).float().mean())
                    rows.append(dict(shape=name, m=m, weights=fmt, sparsity=sp, rows_needed=round(needed, 3),
                                     fp32_ms=round(fp32, 3), packed_ms=packed and round(packed, 3),
                                     gather_ms=gather and round(gather, 3), bag_ms=round(bag_ms, 3),
                                     bag_vs_fp32=round(fp32 / bag_ms, 3),
                                     bag_vs_packed=packed and round(packed / bag_ms, 3),
                                     kernel_ms=kernel_ms and round(kernel_ms, 3),
                                     kernel_vs_fp32=kernel_ms and round(fp32 / kernel_ms, 3),
                                     kernel_vs_packed=packed and kernel_ms and round(packed / kernel_ms, 3)))
                    print(rows[-1], flush=True)
    tag = f"-{a.shapes}" + ("-stream" if a.stream else "") + ("" if a.dtype == "float32" else "-" + a.dtype) + ("" if a.weights == "float,int8,int4" else "-" + a.weights.replace(",", "-"))
    out = Path(__file__).parent / "results" / f"sparse-cpu{tag if tag != '-7b' else ''}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"benchmark": "sparse_cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "date": datetime.date.today().isoformat(), "machine": "2-core CPU dev box",
                               "stream": a.stream, "weights": a.weights, "dtype": a.dtype, "raw_bags": a.raw_bags, "last_level_cache_bytes": llc,
                               "load_avg_at_start": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
