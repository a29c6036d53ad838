"""CPU speed of decode-shaped linears: dense fp32 vs effcompile's embedding-bag GEMV, dense and sparse, float/int8/int4.

Llama-7B projections (4096 -> 11008, 11008 -> 4096), fp32 activations, 1 and 8 rows. Per weight format:
  fp32_ms     dense F.linear with the fp32 weight (the baseline every ratio is against)
  packed_ms   the format's previous CPU path (torch's packed int8/int4 ops: wq_linear_eager)
  gather_ms   the row-gather sparse path (sparse_linear_eager) at the same sparsity
  bag_ms      the embedding-bag GEMV codegen lowers sparse_linear / wq_linear to on CPU
at 0/25/40/50/60 % activation sparsity (thresholds = quantiles of |x|). Median of --reps calls.
Writes benchmarks/results/sparse-cpu-<date>.json.

    python benchmarks/sparse_cpu.py [--reps 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from quantize import median_ms  # benchmarks/quantize.py: warm-up + median, no grad

from effcompile.codegen.kernels import cpu_bag_gemv as bag
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl

SHAPES = {"7b.up": (11008, 4096), "7b.down": (4096, 11008)}
SPARSITY = (0.0, 0.25, 0.4, 0.5, 0.6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) / k**0.5
        formats = {"float": (w, None, None, 0)}
        for fmt, g in (("int8", 0), ("int4", 128)):
            qw = qops.quantize_weight(w, fmt, g)
            formats[fmt] = (qw.qweight, qw.scales, qw.zeros, g)
        for m in (1, 8):
            x = torch.randn(m, k, generator=gen)
            fp32 = median_ms(lambda x=x, w=w: F.linear(x, w), a.reps)
            for fmt, (q, s, z, g) in formats.items():
                packed = None if fmt == "float" else median_ms(
                    lambda x=x, q=q, s=s, z=z, g=g, fmt=fmt: qops.wq_linear_eager(x, q, s, z, None, fmt, g), a.reps)
                wt, st, zt = sl.to_input_major(q, s, z, fmt, g)
                rows_t = bag.pack(wt, fmt)
                for sp in SPARSITY:
                    t = torch.quantile(x.abs().flatten(), sp) if sp else torch.tensor(0.0)
                    bag_ms = median_ms(lambda x=x, t=t, st=st, zt=zt, g=g, fmt=fmt, r=rows_t:
                                       bag.run(x, t, r, st, zt, None, fmt, g, "bench", False), a.reps)
                    gather = median_ms(lambda x=x, t=t, wt=wt, st=st, zt=zt, g=g, fmt=fmt:
                                       sl.sparse_linear_eager(x, t, wt, st, zt, None, fmt, g, "bench", False), a.reps)
                    needed = float((x.abs() > t).any(0).float().mean())
                    rows.append(dict(shape=name, m=m, weights=fmt, sparsity=sp, rows_needed=round(needed, 3),
                                     fp32_ms=round(fp32, 3), packed_ms=packed and round(packed, 3),
                                     gather_ms=round(gather, 3), bag_ms=round(bag_ms, 3),
                                     bag_vs_fp32=round(fp32 / bag_ms, 3),
                                     bag_vs_packed=packed and round(packed / bag_ms, 3)))
                    print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / f"sparse-cpu-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"benchmark": "sparse_cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "date": datetime.date.today().isoformat(), "machine": "2-core CPU dev box",
                               "load_avg_at_start": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
