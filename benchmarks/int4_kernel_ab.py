"""A/B of two versions of the CPU int4 C kernel (cpu_int4_gemv.c) in one process, calls alternating.

The working tree's kernel against the one at a git revision (default HEAD), both built by codegen/native.py and
checked against the reference, timed call by call in turn on the same weights and inputs (Llama-3.2-1B shapes and its
LM head, weights from DRAM as in sparse_cpu.py --stream): on the 2-core box two processes differ by 10-30 %, more than
a kernel change moves (session 26). Prints one line per case; --out writes the medians and their ratio as JSON.

    python benchmarks/int4_kernel_ab.py [--rev HEAD] [--dtype bfloat16] [--rows 1,8] [--cache-resident] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sparse_cpu import copies_of, last_level_cache_bytes  # benchmarks/sparse_cpu.py

from effcompile.codegen import native
from effcompile.codegen.kernels import cpu_int4_gemv as G
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl

SHAPES = {"1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
          "1b.head": (128256, 2048)}
SPARSITY = (0.0, 0.25, 0.5, 0.6)


def kernel_at(rev: str) -> native.Kernel:
    """The kernel as committed at ``rev``, built from a copy of its source (the build cache keys on the text)."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:{G.SOURCE.relative_to(root)}"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    src = Path(tempfile.mkdtemp(prefix="effcompile-int4-ab-")) / G.SOURCE.name
    src.write_text(text)
    return native.Kernel(f"CPU int4 GEMV @ {rev}", src, G.KERNEL.symbol, G.KERNEL.argtypes, G.KERNEL.restype,
                         G.KERNEL.check, "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the 'old' kernel (the working tree's is 'new')")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="x and the scales")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--cache-resident", action="store_true", help="one copy of each weight, read from cache")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    old = kernel_at(a.rev)
    for k in (old, G.KERNEL):
        if k.unavailable():
            sys.exit(k.unavailable())
    fns = {"old": old.fn, "new": G.KERNEL.fn}
    dtype, llc, gen, rows = getattr(torch, a.dtype), last_level_cache_bytes(), torch.Generator().manual_seed(0), []
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        qw = qops.quantize_weight((torch.randn(n, k, generator=gen) / k**0.5).to(dtype), "int4", 128)
        copies = copies_of(G.pack(*sl.to_input_major(qw.qweight, qw.scales, qw.zeros, "int4", 128)), llc, not a.cache_resident)
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, generator=gen).to(dtype)
            for sp in SPARSITY:
                t = torch.quantile(x.abs().flatten().float(), sp) if sp else None
                times, names, n_c = {v: [] for v in fns}, list(fns), len(copies)
                for i in range(2 * a.reps * max(n_c, 10)):
                    # each call on the next copy (cold: the copies fill twice the LLC), the versions taking turns and,
                    # with an even number of copies, swapping them each pass (timing both versions on one copy back
                    # to back handed the second the first's cache: a 1.3-1.7x that was not there)
                    panels, sz = copies[i % n_c]
                    v = names[(i + i // n_c) % 2 if n_c % 2 == 0 else i % 2]
                    t0 = time.perf_counter()
                    G._call(fns[v], x, t, panels, sz, n, 128)
                    times[v].append(time.perf_counter() - t0)
                med = {v: round(statistics.median(ts) * 1e3, 4) for v, ts in times.items()}
                rows.append({"shape": name, "m": m, "sparsity": sp, "old_ms": med["old"], "new_ms": med["new"],
                             "old_vs_new": round(med["old"] / med["new"], 3)})
                print(rows[-1], flush=True)
    if a.out:
        a.out.write_text(json.dumps({"benchmark": "int4_kernel_ab", "old": a.rev, "new": "working tree",
                                     "weights": "cache-resident" if a.cache_resident else "from DRAM (copies)",
                                     "dtype": a.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                     "date": datetime.date.today().isoformat(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
