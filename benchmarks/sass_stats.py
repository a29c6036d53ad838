"""Static kernel report (no GPU): compile each decode kernel launch for sm_90, read its SASS hot loop.

For a GEMV that should be bound by reading its weights, the loop must issue few instructions per weight
byte: an H100 issues at most 4 warp-instructions per clock per SM, so a loop that spends I warp-
instructions on B bytes of weights cannot read faster than B / I x 4 x SMs x clock ("issue ceiling"), however
fast HBM is. The report gives that ceiling, the loads' widths (a 2-byte load per activation element costs
an instruction each), conversions and shuffles per iteration, registers and CTAs per SM. It is a proxy that
ranks kernel variants on a CPU-only machine; speed is only ever what benchmarks/kernels.py measures on a GPU.
Counts are static: a branch inside the loop counts as if it ran every iteration (loop_if_body_instructions says
how many of them an if inside the loop can skip, e.g. the flat sparse path's scale reload at a group change).

    python benchmarks/sass_stats.py --output benchmarks/results/sass-sm90-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effcompile.codegen import aot  # noqa: E402
from effcompile.codegen.kernels import dequant_matmul as D  # noqa: E402
from effcompile.codegen.kernels import launch_plan as plan  # noqa: E402
from effcompile.codegen.kernels import sparse_gemv as S  # noqa: E402
from effcompile.compiler import ops as qops  # noqa: E402
from effcompile.compiler import sparse_linear as sl  # noqa: E402

BYTES_PER_WEIGHT = {"float": 2, "int8": 1, "int4": 0.5}
GROUP = 128
# H100 SXM: 132 SMs, 4 schedulers each issuing one warp-instruction per clock, 1.98 GHz boost clock,
# 65536 registers and 228 KB shared memory per SM, at most 64 warps / 32 CTAs per SM.
SM90 = {"sms": 132, "issue_per_clock": 4, "ghz": 1.98, "regs": 65536, "smem": 228 * 1024, "warps": 64, "ctas": 32}


def _launch(kernel: str, fmt: str, rows: int, config, n: int, k: int):
    """Record the one launch the effcompile launcher makes for this decode call (bf16 activations)."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) / 20).to(dtype)
    x = torch.randn(rows, k, generator=gen, dtype=torch.float32).to(dtype)
    group = GROUP if fmt == "int4" else 0
    with aot.record_launches() as seen:
        if kernel == "dequant":
            q = qops.quantize_weight(w, fmt, group)
            D.launch(x, *q[:3], None, fmt, group, config=config)
        else:
            q = qops.quantize_weight(w, fmt, group) if fmt != "float" else None
            wt, s, z = sl.to_input_major(w if q is None else q.qweight, *((None, None) if q is None else
                                                                         (q.scales, q.zeros)), fmt, group)
            S.launch(x, torch.tensor(0.5), wt, s, z, None, fmt, group, config=config)
    (launch,) = seen
    return launch


def ctas_per_sm(regs: int, warps: int, smem: int, gpu=SM90) -> int:
    regs_per_warp = math.ceil(regs * 32 / 256) * 256  # allocated per warp in units of 256
    return min(gpu["regs"] // (regs_per_warp * warps), gpu["smem"] // max(smem + 1024, 1), gpu["warps"] // warps,
               gpu["ctas"])


def segment_cost(kw: dict, found: list) -> dict | None:
    """A compacted sparse launch's instructions per segment (an int4 group) that keeps 2, 4 or 8 chunks (8b.up at
    50 % keeps ~64 of 128 channels: 4 chunks of 16), from its loops: the per-segment path's chunk loop inside its
    segment loop; the flat path's chunk loop without its if-body (the scale reload, once a segment) and its
    compaction step, shared by SEGS segments. None for other launches."""
    if not kw.get("COMPACT"):
        return None
    if kw.get("FLAT"):
        chunk, compaction = found[-1], found[0]
        common, once = chunk.instructions - chunk.skippable, chunk.skippable + compaction.instructions / kw["SEGS"]
    else:
        chunk, segment = found[0], found[1]
        common, once = chunk.instructions, segment.instructions - chunk.instructions
    return {f"{c}_chunks": round(c * common + once) for c in (2, 4, 8)}


def report(kernel: str, fmt: str, rows: int, config, n: int = 14336, k: int = 4096, gpu=SM90) -> dict:
    launch = _launch(kernel, fmt, rows, config, n, k)
    compiled = aot.compile_launch(launch, 90)
    kw = launch.kwargs
    warps, block_n, block_k = kw["num_warps"], kw["BLOCK_N"], kw["BLOCK_K"]
    regs, smem = aot.registers(compiled), compiled.metadata.shared
    found = aot.loops(aot.sass(compiled))
    # The K loop: the longest, or a flat compacted launch's chunk loop, its last (after the compaction's).
    hot = found[-1] if kw.get("FLAT") else max(found, key=lambda lp: lp.instructions)
    weight_bytes = block_n * block_k * BYTES_PER_WEIGHT[fmt]  # read by one CTA per iteration
    per_instr = weight_bytes / (hot.instructions * warps)
    ops = hot.opcodes
    return {
        "kernel": kernel, "fmt": fmt, "rows": rows, "config": list(config) if config else None,
        "block_m": kw["BLOCK_M"], "block_n": block_n, "block_k": block_k, "warps": warps,
        "stages": kw.get("num_stages"), "fma": bool(kw.get("FMA")), "grid": list(launch.grid),
        "registers": regs, "shared_bytes": smem, "ctas_per_sm": ctas_per_sm(regs, warps, smem, gpu),
        "loop_instructions": hot.instructions, "loop_if_body_instructions": hot.skippable,
        "weight_bytes_per_iteration": weight_bytes,
        "weight_bytes_per_warp_instruction": round(per_instr, 3),
        "issue_ceiling_gbs": round(per_instr * gpu["sms"] * gpu["issue_per_clock"] * gpu["ghz"]),
        "load_bytes_per_thread": hot.load_bytes, "loads": dict(hot.loads),
        "int_to_float": sum(v for o, v in ops.items() if o.startswith("I2F")),
        "shuffles": sum(v for o, v in ops.items() if o.startswith("SHFL")),
        "barriers": sum(v for o, v in ops.items() if o.startswith("BAR")),
        "mma": sum(v for o, v in ops.items() if o.startswith(("HMMA", "HGMMA"))),
        "top_opcodes": dict(ops.most_common(8)),
        "instructions_per_segment": segment_cost(kw, found),
    }


def default_cases() -> list[tuple]:
    """(kernel, fmt, rows, config): each decode kernel with its built-in shape and the H100 table's."""
    table = plan.read_tables([plan.TUNING_DIR / "NVIDIA_H100_80GB_HBM3.json"], "NVIDIA H100 80GB HBM3")
    cases = []
    for kernel, fmts in (("dequant", ("int8", "int4")), ("sparse", ("float", "int8", "int4"))):
        for fmt in fmts:
            for rows in (1, 8):
                cases.append((kernel, fmt, rows, None))
                if (tuned := table.get(plan.tuning_key(kernel, fmt, rows))) is not None:
                    cases.append((kernel, fmt, rows, tuned))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", help="JSON file for the rows")
    p.add_argument("--config", action="append", default=[],
                   help="extra case kernel:fmt:rows:block_n,block_k,warps,stages,splits[,fma,compact,scale_words,flat] "
                        "(e.g. dequant:int4:1:128,128,4,3,8,1 or sparse:int4:1:512,8,4,1,None,True,True); "
                        "replaces the default cases")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    cases = default_cases()
    if args.config:
        cases = []
        for spec in args.config:
            kernel, fmt, rows, cfg = spec.split(":")
            v = [None if t in ("None", "") else t == "True" if t in ("True", "False") else int(t)
                 for t in cfg.split(",")]
            # fields after splits (fma, compact, scale_words) are flags: True/False or 1/0
            cases.append((kernel, fmt, int(rows), plan.Config(*v[:5], *(bool(f) for f in v[5:]))))
    rows = []
    for case in cases:
        r = report(*case)
        rows.append(r)
        print(f"{r['kernel']:7s} {r['fmt']:5s} m={r['rows']} {str(r['config']):32s} regs {r['registers']:3d} "
              f"ctas/SM {r['ctas_per_sm']} loop {r['loop_instructions']:4d} instr  "
              f"{r['weight_bytes_per_warp_instruction']:5.2f} B/warp-instr  ceiling {r['issue_ceiling_gbs']:5d} GB/s  "
              f"loads {r['loads']}  i2f {r['int_to_float']} shfl {r['shuffles']}"
              + (f"  per segment {r['instructions_per_segment']}" if r["instructions_per_segment"] else ""), flush=True)
    if args.output:
        import triton
        meta = {"what": "static SASS hot-loop statistics of effcompile decode kernels, compiled for sm_90 without "
                        "a GPU (benchmarks/sass_stats.py); a proxy, not a timing",
                "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "triton": triton.__version__, "host": platform.node(), "gpu_model": SM90, "shape": [14336, 4096]}
        Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
