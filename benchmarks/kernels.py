"""Kernel benchmark (GPU): decode-shaped linears, our Triton kernels vs cuBLAS bf16, dequant-then-matmul and TorchAO.

For each weight shape (Llama-3.1-8B and Llama-3.2-1B projections) and each batch (rows of activations),
times y = x @ W.T + nothing with:
  dense        F.linear in the activation dtype (cuBLAS)
  dequant+mm   dequantize our packed weight, then F.linear (the naive baseline)
  ec-int8 / ec-int4-gG   effcompile's fused dequant GEMV/GEMM (codegen/kernels/dequant_matmul.py)
  ao-int8 / ao-int4-g128 TorchAO Int8WeightOnlyConfig / Int4WeightOnlyConfig (tinygemm layout) on an
                         nn.Linear under torch.compile, as TorchAO users run it (when torchao imports)
and reports median time (CUDA-graph replays; by default with L2 cold before every call, since a 4-bit
8B-MLP weight fits in an H100's L2 and back-to-back calls would time L2, not HBM), the bytes the kernel
must read (weights + scales/zeros + activations + output) and GB/s against the read peak (a 2 GiB sum) of
the same run. Every variant's output is checked against the dequantized reference first:
a wrong kernel is reported as failed, never timed.

    python benchmarks/kernels.py --device cuda --output benchmarks/results/kernels-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effcompile.bench import timing  # noqa: E402
from effcompile.codegen.kernels import dequant_matmul as D  # noqa: E402
from effcompile.codegen.kernels import launch_plan as plan  # noqa: E402
from effcompile.codegen.kernels import sparse_gemv as S  # noqa: E402
from effcompile.compiler import ops as qops  # noqa: E402
from effcompile.compiler import sparse_linear as sl  # noqa: E402

SHAPES = {  # name -> (N out, K in)
    "8b.up": (14336, 4096),
    "8b.down": (4096, 14336),
    "8b.o": (4096, 4096),
    "1b.up": (8192, 2048),
    "1b.down": (2048, 8192),
    # Llama-3.2-1B's decode GEMVs as effcompile runs them (FuseParallelLinears joins q/k/v and gate/up):
    # small weights (2-17 MB of int4) where a launch's fixed costs weigh more than on the 8B shapes.
    "1b.qkv": (3072, 2048),
    "1b.o": (2048, 2048),
    "1b.gate_up": (16384, 2048),
}
SWEEP_SHAPES = ("8b.up", "8b.down")
BATCHES = (1, 8)


TIMING = {"cudagraph-cold-l2": 0, "cudagraph-hot-l2": 0, "events": 0}  # timings per method (in the results)
L2 = {"mode": "cold"}  # "cold": every timed call reads its weights from HBM; "hot": back-to-back replays
_FLUSH: dict = {}


def _graph_ms(body: Callable[[], object], reps: int, replays: int = 10) -> float:
    """Median ms of one replay of a CUDA graph holding ``reps`` calls of body (captured as the decode
    harness captures a step: warm-up on a side stream, then one replay per timed event pair)."""
    times = timing.graphed_steps(lambda: [body() for _ in range(reps)], 2, replays)
    return sorted(times)[len(times) // 2]


def _bench_cold(fn: Callable[[], torch.Tensor], reps: int = 20) -> float:
    """ms of one call of fn with nothing of it in L2: each call follows a read of 4x the L2 size, and the
    reads alone, timed the same way, are subtracted. A 4-bit 8B-MLP weight (29 MB) fits in an H100's
    50 MB L2, so back-to-back replays would time L2 reads for the small formats and HBM reads for bf16."""
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = torch.cuda.get_device_properties(dev).L2_cache_size
        _FLUSH[dev] = torch.ones(max(4 * l2, 64 << 20) // 4, dtype=torch.float32, device="cuda")
    buf = _FLUSH[dev]
    both = _graph_ms(lambda: (buf.sum(), fn()), reps)
    alone = _graph_ms(buf.sum, reps)
    return max(both - alone, 0.0) / reps


def _bench(fn: Callable[[], torch.Tensor]) -> float:
    """Median GPU time of fn in ms, from CUDA-graph replays, so the Python launch cost (tens of us for a
    Triton launch, a dynamo guard check for a compiled peer) does not hide the kernel's own time; the
    first H200 run timed with events only and measured mostly that launch cost. L2["mode"] picks cold
    (default, _bench_cold) or hot L2. Falls back to triton's do_bench (events; it zeroes a 256 MB buffer
    before each call, so L2 is cold there too) when fn cannot be captured."""
    import triton.testing

    try:
        if L2["mode"] == "cold":
            ms = _bench_cold(fn)
        else:
            ms = float(triton.testing.do_bench_cudagraph(fn, rep=5, return_mode="median"))
        TIMING[f"cudagraph-{L2['mode']}-l2"] += 1
        return ms
    except Exception:  # noqa: BLE001 - e.g. an op that syncs: time it with events instead
        torch.cuda.synchronize()
        TIMING["events"] += 1
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def copy_bandwidth(device: str) -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read + written."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _graph_ms(lambda: dst.copy_(src), 1)
    return 2 * 2**30 / (ms / 1e3) / 1e9


def read_bandwidth(device: str) -> float:
    """GB/s of summing 2 GiB: the read-only peak a decode GEMV (reading weights, writing little) can reach."""
    src = torch.ones(2**29, dtype=torch.float32, device=device)
    ms = _graph_ms(src.sum, 1)
    return 2**31 / (ms / 1e3) / 1e9


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _torchao_linear(w: torch.Tensor, which: str):
    """A compiled nn.Linear quantized by TorchAO, or the reason it could not be built."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - the peer is optional; its absence is a recorded fact
        return None, f"torchao not importable: {type(e).__name__}: {e}"
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    try:
        if which == "int8":
            quantize_(lin, Int8WeightOnlyConfig())
        else:
            quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        return torch.compile(lin, fullgraph=True), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:300]}"


SPARSE = [("float", 0.0), ("float", 0.4), ("float", 0.5), ("int8", 0.5), ("int4", 0.4), ("int4", 0.5)]
# One row only: sparse x int4 with every channel kept and with none. Time = fixed cost + bytes / rate, so the two
# ends separate what a launch costs before reading any weight row (compaction, scales, the sum across warps,
# the epilogue) from the rate at which it reads them: session 18 found the 50 % row latency-bound, not issue-bound.
SPARSE_ENDS = [("int4", 0.0), ("int4", 1.0)]


def sparse_threshold(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The |x| quantile that zeroes ``sparsity`` of x (TEAL's per-tensor rule, calibrated on x itself)."""
    if sparsity == 0:
        return torch.zeros((), device=x.device)
    return torch.quantile(x.float().abs().flatten(), sparsity)


def sparse_inputs(x, w, quant, fmt: str, sparsity: float):
    """(launch args, bytes actually read): weight rows (and int4 scale/zero rows) of channels still needed."""
    if fmt == "float":
        wt, st, zt, group = *sl.to_input_major(w, None, None, "float", 0), 0
    else:
        group = 0 if fmt == "int8" else 128
        qw = quant[(fmt, group)]
        wt, st, zt = sl.to_input_major(qw.qweight, qw.scales, qw.zeros, fmt, group)
    t = sparse_threshold(x, sparsity)
    need = (x.abs() > t).any(0)  # [K]: rows of W^T some activation row needs
    k = x.shape[1]
    read = int(need.sum()) * wt.shape[1] * wt.element_size()
    if fmt == "int8":
        read += _nbytes(st)
    if fmt == "int4":
        groups = int(need.view(k // group, group).any(1).sum())
        read += 2 * groups * st.shape[1] * st.element_size()
    return (x, t, wt, st, zt, None, fmt, group), read


# One-row int4 at 50 % in the flat compacted form too (Config.flat, session 17, untimed), on launch_plan.UNTUNED's
# tile with 4 chunks prefetched: the rows compare it with the default launch whether or not a sweep ran.
FLAT_INT4 = plan.Config(256, 16, 4, 5, None, True, True, flat=True)
# Rows up to SKIP_ROWS_MAX at 50 % int4 also on the 8-row sweep's winner of session 21, a 16-row dot tile with 16 K
# splits: at 8 rows, reading every weight row, it ran 8b.up in 23.9 us, faster than the one-row launches reading half
# of them (26.8 us session 18's default, 23.1 its sweep's compacted tile). Masked loads skip the rows not kept here.
# At 0 % (one row) it is dense int4 in the input-major layout, against the output-major dequant GEMV (ec-int4-g128).
DOT_INT4 = plan.Config(256, 64, 4, 3, 16)


def sparse_variants(x, w, quant, out_bytes: int) -> dict:
    out = {}
    for fmt, sparsity in SPARSE + (SPARSE_ENDS if x.shape[0] == 1 else []):
        args, read = sparse_inputs(x, w, quant, fmt, sparsity)
        label = f"ec-sparse{int(sparsity * 100)}-{fmt if fmt != 'int4' else 'int4-g128'}"
        out[label] = (lambda args=args: S.launch(*args), read + _nbytes(x) + out_bytes, S.reference(*args))
        if fmt == "int4" and sparsity == 0.5 and x.shape[0] == 1:
            out[label + "-flat"] = (lambda args=args: S.launch(*args, config=FLAT_INT4), read + _nbytes(x) + out_bytes,
                                    S.reference(*args))
        if fmt == "int4" and sparsity in (0.0, 0.5) and x.shape[0] <= S.SKIP_ROWS_MAX:  # 0 %: input-major dense int4
            out[label + "-dot"] = (lambda args=args: S.launch(*args, config=DOT_INT4), read + _nbytes(x) + out_bytes,
                                   S.reference(*args))
        if fmt != "float" and sparsity == 0.5 and S.SKIP_ROWS_MAX < x.shape[0] <= sl.DECODE_MAX_ROWS:
            # The same launch as a GEMM over M tiles (dot tiles, the prefill path), which also reads every row here:
            # is it faster than the GEMV at these rows (session 18, 8 rows: int8 46 us, int4 63 us)?
            out[label + "-gemm"] = (lambda args=args: S.launch(*args, gemm=True), read + _nbytes(x) + out_bytes,
                                    S.reference(*args))
        if fmt == "float" and sparsity == 0.5 and x.shape[0] > S.SKIP_ROWS_MAX:
            # Past SKIP_ROWS_MAX the kernel reads every weight row: the alternative is x thresholded by torch, then
            # cuBLAS on the input-major weight as it is (an NN GEMM; session 18 timed only the TN dense row).
            xx, t, wt = args[:3]
            out["thr+mm-sparse50-float"] = (lambda xx=xx, t=t, wt=wt: torch.where(xx.abs() > t, xx, 0) @ wt,
                                            _nbytes(wt, xx) + out_bytes, S.reference(*args))
    return out


def bench_shape(name: str, n: int, k: int, batches, dtype, device: str, peak: float, with_torchao: bool) -> list:
    gen = torch.Generator(device="cpu").manual_seed(0)
    w_cpu = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    w = w_cpu.to(device)
    rows = []
    quant = {}
    for fmt, group in (("int8", 0), ("int4", 64), ("int4", 128)):
        qw = qops.quantize_weight(w, fmt, group)
        quant[(fmt, group)] = qw
    peers = {}
    if with_torchao:
        for which in ("int8", "int4"):
            peers[which] = _torchao_linear(w, which)
    for m in batches:
        x = torch.randn(m, k, device=device, dtype=dtype)
        out_bytes = m * n * x.element_size()
        ref_dense = F.linear(x, w)
        variants: dict[str, tuple[Callable, int, torch.Tensor]] = {
            "dense": (lambda x=x: F.linear(x, w), _nbytes(w, x) + out_bytes, ref_dense),
        }
        for (fmt, group), qw in quant.items():
            label = fmt if fmt == "int8" else f"{fmt}-g{group}"
            qb = qw.nbytes() + _nbytes(x) + out_bytes
            ref = qops.reference(x, *qw[:3], None, fmt, group)
            variants[f"ec-{label}"] = (lambda x=x, qw=qw, fmt=fmt, group=group: D.launch(x, *qw[:3], None, fmt, group),
                                       qb, ref)
            if fmt == "int8" or group == 128:
                variants[f"dequant+mm-{label}"] = (
                    lambda x=x, qw=qw, fmt=fmt, group=group: F.linear(x, qops.dequantize(*qw[:3], fmt, group, dtype)),
                    qb, ref)
        for label, entry in sparse_variants(x, w, quant, out_bytes).items():
            variants[label] = entry
        for which, (mod, why) in peers.items():
            label = "ao-int8" if which == "int8" else "ao-int4-g128"
            if mod is None:
                rows.append(dict(shape=name, n=n, k=k, m=m, variant=label, failed=why))
                continue
            qb = quant[("int8", 0)].nbytes() if which == "int8" else quant[("int4", 128)].nbytes()
            with torch.no_grad():
                got = mod(x)
            variants[label] = (lambda x=x, mod=mod: mod(x), qb + _nbytes(x) + out_bytes, got)  # checked vs dense below
        for label, (fn, nbytes, ref) in variants.items():
            row = dict(shape=name, n=n, k=k, m=m, variant=label, bytes=nbytes)
            try:
                with torch.no_grad():
                    got = fn()
                    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    err_dense = ((got.float() - ref_dense.float()).norm() / ref_dense.float().norm()).item()
                    row.update(rel_err_vs_reference=err, rel_err_vs_dense=err_dense)
                    if label.startswith("ec-") and err > 2e-2:
                        row["failed"] = f"output differs from its reference (rel err {err:.3g})"
                    else:
                        ms = _bench(fn)
                        gbps = nbytes / (ms / 1e3) / 1e9
                        row.update(ms=ms, gb_per_s=gbps, fraction_of_read_peak=gbps / peak)
            except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
                row["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
        dense_ms = next((r["ms"] for r in rows if r["shape"] == name and r["m"] == m and r["variant"] == "dense"
                         and "ms" in r), None)
        for r in rows:
            if r["shape"] == name and r["m"] == m and "ms" in r and dense_ms:
                r["speedup_vs_dense"] = dense_ms / r["ms"]
    return rows


def _configs(sparse: bool, m: int, int4: bool = False) -> list:
    blocks_n = (64, 128, 256) if sparse else (32, 64, 128)
    blocks_k = (64, 128) if sparse else (128, 256)
    grid = [plan.Config(bn, bk, 4, 3) for bn in blocks_n for bk in blocks_k]
    grid += [plan.Config(blocks_n[-1], blocks_k[-1], 8, 3), plan.Config(blocks_n[1], blocks_k[-1], 8, 4)]
    if not sparse:
        # Deeper pipelines (session 11, untimed): with 8 K splits a dense int4 CTA runs only 4 chunks of 128, so
        # 5 stages have every chunk in flight from the prologue (sm_90 SASS: the 3-stage loop waits on its
        # scale loads after each chunk's copy, with at most one chunk in flight).
        grid += [plan.Config(blocks_n[-1], blocks_k[-1], 8, 5), plan.Config(blocks_n[1], blocks_k[-1], 4, 5)]
    # fma (products summed in registers, no 16-row padding): short tiles, since the [rows, K, N] product
    # lives in registers; the sparse layout is N-contiguous (wide N tiles), the dense one K-contiguous.
    # Untimed when added (session 6, no GPU): the sweep decides whether they win anywhere.
    if sparse:
        # (512, 8): the compacted int4 word path (one row) in 8-row chunks of a group's kept channels.
        fma = [(128, 32, 4, 1), (256, 16, 4, 1), (64, 64, 4, 2), (256, 32, 8, 1), (512, 16, 4, 1), (512, 8, 4, 1)]
        # stages 2 on the one-row float / int8 masked path: the next chunk's x, thresholds and kept rows loaded
        # before this chunk's arithmetic (session 14, untimed; sm_90 / triton 3.6: (256, 16) 72 registers, 7 CTAs
        # per SM; (512, 16) 146, 3 CTAs, against 127 and 4 for session 13's winner (512, 16, 4, 1)).
        fma += [(256, 16, 4, 2), (512, 16, 4, 2), (128, 32, 4, 2)]
    else:
        # (128, 64): for int4 at one row the fewest registers of the word-decoding branch (56, 9 CTAs per SM on
        # sm_90, benchmarks/sass_stats.py; session 9, untimed).
        fma = [(32, 256, 4, 1), (64, 128, 4, 1), (16, 512, 4, 1), (64, 256, 8, 1), (128, 64, 4, 1)]
        # stages 2: one-row int4 double-buffers its loads in registers (dequant_matmul PREFETCH; session 10,
        # untimed): 96 registers, 5 CTAs per SM on sm_90, against 80 and 6 for (64, 128, 4, 1).
        fma += [(64, 128, 4, 2), (128, 64, 4, 2), (32, 256, 4, 2)]
        # For int4 at one row (and the 16-bit dot tiles above), block_k 256 / 512 now spans 2-4 groups of 128
        # (dequant_matmul GPC, session 12, untimed; before, the launcher cut every int4 chunk to one group):
        # 128-256 contiguous bytes per output instead of 64. sm_90 SASS with triton 3.6: one-row (32, 256) 80
        # registers, (16, 512) 72, issue ceilings 2.4 TB/s like (64, 128)'s; the 8-row dot tile (128, 256, 8, 3)
        # 160 registers and 88 KB of shared memory, 1 CTA per SM, against 2 for (128, 128, 8, 3).
        # Session 14 (scale and zero out of each word's nibble sum, unmasked even tiles; untimed): 8 words a thread
        # is the sweet spot, 72 registers and 339-365 loop instructions for (32, 256) / (16, 512) at 4 warps
        # (7 CTAs per SM); 16 words a thread ((64, 256, 4), (32, 512, 4)) spill to 255 registers.
        fma += [(16, 512, 4, 2), (64, 256, 8, 2)]
    if m > 1:  # 8 rows multiply the register tile by 8: halve K
        fma = [(bn, bk // 2, w, st) for bn, bk, w, st in fma]
    configs = grid + [plan.Config(*c, None, True) for c in fma]
    if int4 and not sparse:  # 16-bit dot tiles reading scales and zeros as int32 words (Config.scale_words,
        # session 11, untimed): no synchronous load left in the K loop on sm_90, for 5-40 % more instructions.
        # Words apply to one-group chunks only (block_k = 128): until session 22 three of these four had block_k 256,
        # which the launcher runs as plain two-group chunks (GPC 2, 2-byte scale loads), so the sweep never timed
        # words on them. sm_90 SASS, triton 3.6, 8b.up at 8 rows: (128, 128, 8, 3) 89 registers, 391 loop
        # instructions, no plain load, against 106 / 274 and four synchronous LDG.E.U16 for the shipped tile;
        # (128, 128, 4, 3) 167 / 486, 3 CTAs per SM; (256, 128, 8, 3) 185 / 450, 1 CTA.
        configs += [plan.Config(*c, None, scale_words=True) for c in ((128, 128, 4, 3), (128, 128, 8, 3),
                                                                      (256, 128, 8, 3), (64, 128, 4, 4))]
    if sparse and m == 1:  # the same fma tiles visiting only the kept channels (Config.compact, session 10),
        # and with stages 2: the next chunk of kept rows prefetched in registers. The compacted int4 launch
        # looks latency-bound (H100 session 13: 26 us for 8b.up at 50 %, ~625 GB/s): each chunk's weight load
        # waits on its index load, a segment's first chunk on its scale loads, and a CTA keeps one 2 KB chunk
        # in flight, ~8 KB per SM at 4 CTAs, where ~23 KB per SM would cover HBM's latency at 3 TB/s. The
        # narrow-CTA tiles below keep more chunks in flight per SM (sm_90 SASS, triton 3.6: (256, 8, 2, 2)
        # 111 registers, 9 CTAs per SM, ~18 KB; (128, 16, 1, 2) 159, 12 CTAs, ~24 KB); untimed.
        # Stages 3 (session 14, untimed): the kept-row indices loaded two chunks ahead too, so a weight load never
        # waits on an index load just issued (sm_90: (256, 16, 4, 3) 118 registers against 116 at stages 2).
        configs += [plan.Config(*c, None, True, True) for c in fma + [(512, 8, 4, 2), (256, 8, 2, 2), (256, 16, 2, 2),
                                                                      (128, 16, 1, 2), (256, 16, 4, 3), (512, 8, 4, 3),
                                                                      (256, 8, 2, 3)]]
        # Config.flat (session 17, untimed): the whole K split compacted first, then one chunk loop prefetching
        # stages - 1 chunks across segments (sm_90 SASS, int4 8b.up, triton 3.6 / 3.9: (256, 16, 4, s) 93-126
        # registers, 884-1017 instructions a group of 4 kept chunks against 934-1008 per segment, no barrier in the
        # chunk loop; (512, 16, 4, 3) 161-167 registers, 3 CTAs per SM, ~15 % fewer instructions per weight byte).
        configs += [plan.Config(*c, None, True, True, flat=True) for c in ((256, 16, 4, 2), (256, 16, 4, 3),
                                                                           (256, 16, 4, 5), (512, 8, 4, 3),
                                                                           (512, 8, 4, 5), (512, 16, 4, 3))]
    return configs


def _sweep_cases(x, w, quant) -> dict:
    """(kernel, fmt) -> (launch taking a Config or None, bytes read) for one shape and batch."""
    cases = {("dequant", f): (lambda cfg, x=x, qw=qw, f=f, g=g: D.launch(x, *qw[:3], None, f, g, config=cfg),
                              qw.nbytes()) for (f, g), qw in quant.items()}
    for f in ("float", "int8", "int4"):
        args, read = sparse_inputs(x, w, quant, f, 0.5)
        cases[("sparse", f)] = (lambda cfg, args=args: S.launch(*args, config=cfg), read)
    return cases


def _time_configs(runs: list, configs: list) -> list:
    """[(total ms over the shapes, config, [ms per shape])] for every config that agrees with the default
    launch, fastest first."""
    out = []
    for cfg in configs:
        each = []
        try:
            for fn, ref in runs:
                err = ((fn(cfg).float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise ValueError(f"disagrees with the default launch (rel err {err:.3g})")
                each.append(_bench(lambda cfg=cfg, fn=fn: fn(cfg)))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: that config is out
            print(f"  config {tuple(cfg) if cfg else 'default'} skipped: {str(e)[:120]}", flush=True)
            continue
        out.append((sum(each), cfg, each))
    return sorted(out, key=lambda r: r[0])


SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)
SHAPE_GAIN = 0.9  # a shape gets its own entry when its best is under 90 % of the bucket's best there (noise)


def _with_splits(configs) -> list:
    return [cfg._replace(splits=sp) for cfg in configs if cfg is not None for sp in SPLITS]


def _per_shape(runs: list, timed: list, shapes) -> dict:
    """shape name -> (its own best config, its ms, the bucket best's ms on it) where that beats the bucket's
    best by SHAPE_GAIN: the 3 fastest configs on the shape, then K splits around them on that shape alone."""
    best_cfg = timed[0][1]
    own = {}
    for i, name in enumerate(shapes):
        on_shape = sorted(((r[2][i], r[1]) for r in timed), key=lambda r: r[0])
        tried = {cfg for _, cfg in on_shape}
        more = [c for c in _with_splits([cfg for _, cfg in on_shape[:3]]) if c not in tried]
        on_shape = sorted(on_shape + [(r[0], r[1]) for r in _time_configs([runs[i]], more)], key=lambda r: r[0])
        ms, cfg = on_shape[0]
        bucket_ms = next(t for t, c in on_shape if c == best_cfg)
        if cfg is not None and cfg != best_cfg and ms < SHAPE_GAIN * bucket_ms:
            own[name] = (cfg, ms, bucket_ms)
    return own


CASES = ("dequant/int8", "dequant/int4", "sparse/float", "sparse/int8", "sparse/int4")


def parse_case(item: str) -> tuple[str, int | None]:
    """"kernel/format" (every swept batch) or "kernel/format/mN" (batch N only) -> (case, N or None)."""
    parts = item.split("/")
    case, rows = "/".join(parts[:2]), parts[2] if len(parts) == 3 else None
    if case not in CASES or len(parts) > 3 or (rows is not None and not (rows[:1] == "m" and rows[1:].isdigit())):
        raise ValueError(f"sweep case {item!r} unknown: kernel/format[/mN] with kernel/format one of {', '.join(CASES)}")
    return case, int(rows[1:]) if rows is not None else None


def sweep_plan(cases: tuple[str, ...] | None, batches: tuple[int, ...]) -> list[tuple[str, int]]:
    """The (case, batch) pairs a sweep times, in order: each case at every batch before the next, a
    "kernel/format/mN" case at batch N only."""
    return [(case, m) for case, only in map(parse_case, cases or CASES)
            for m in ((only,) if only is not None else batches)]


def sweep(dtype, device: str, peak: float, on_case: Callable[[list, dict], None] | None = None,
          cases: tuple[str, ...] | None = None, budget_s: float | None = None, shapes=SWEEP_SHAPES,
          batches: tuple[int, ...] = (1, 8)) -> tuple[list, dict]:
    """Time the tile configs of our decode kernels on ``shapes`` (two 8B MLP shapes by default); per
    (kernel, format, batch bucket) the config with the least total time, then the best K split for it, and
    per shape its own best where that is clearly faster there (a shape-keyed entry, launch_plan.tuning_key).
    Returns (rows, tuning table); on_case gets both after every case, so a run stopped by a time limit keeps
    what it swept. cases: "kernel/format" cases (e.g. ("sparse/int4", "dequant/int4")), swept in that order,
    each at every batch in ``batches`` before the next, or "kernel/format/mN" at batch N only; default CASES. budget_s: start no new case after that
    many seconds (the comparison that follows still runs, with what was swept): name first what matters most."""
    import time

    order = sweep_plan(cases, batches)
    built = tuple(dict.fromkeys(m for _, m in order))
    start = time.perf_counter()
    setups = {}
    for name in shapes:
        n, k = SHAPES[name]
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
        setups[name] = (w, {(f, g): qops.quantize_weight(w, f, g) for f, g in (("int8", 0), ("int4", 128))})
    per_shape = {}  # batch -> shape name -> the cases' launches on that batch's input
    for m in built:
        per_shape[m] = {}
        for name in shapes:
            w, quant = setups[name]
            x = torch.randn(m, SHAPES[name][1], device=device, dtype=dtype)
            per_shape[m][name] = _sweep_cases(x, w, quant)
    rows, table = [], {}
    for case_name, m in order:
        case = tuple(case_name.split("/"))
        if budget_s is not None and time.perf_counter() - start > budget_s:
            print(f"sweep m={m} {case_name}: skipped, the {budget_s:.0f} s sweep budget is spent", flush=True)
            continue
        runs = [(per_shape[m][s][case][0], per_shape[m][s][case][0](None).float()) for s in shapes]
        nbytes = sum(per_shape[m][s][case][1] for s in shapes)
        timed = _time_configs(runs, _configs(case[0] == "sparse", m, case == ("dequant", "int4")) + [None])
        if not timed:
            continue
        # K splits around the best config and around the best fma one (None: the built-in default,
        # nothing to explore): on the H100 (session 7) fma tiles lost at their auto split but won the
        # sparse GEMV at 64 splits, the largest then tried. Up to one K chunk per program (TEAL's
        # sparse GEMV launches that way).
        # And around the best dot tile (session 21: 8-row sparse int4 took 62.8 us on the shipped dot tile with its
        # auto split and 23.9 us with 16 splits, which the sweep found only from a dot tile that was best overall).
        around = {cfg for _, cfg, _ in timed[:1] + [next((r for r in timed if r[1] and r[1].fma), timed[0])]
                  + [next((r for r in timed if r[1] and not r[1].fma), timed[0])]
                  + [next((r for r in timed if r[1] and r[1].compact), timed[0])]
                  + [next((r for r in timed if r[1] and r[1].flat), timed[0])]}
        more = _with_splits(around)
        timed = sorted(timed + _time_configs(runs, [c for c in more if c not in {r[1] for r in timed}]),
                       key=lambda r: r[0])
        for rank, (ms, cfg, each) in enumerate(timed[:5]):
            gbps = nbytes / (ms / 1e3) / 1e9
            rows.append(dict(case="/".join(case), m=m, shapes=list(shapes), rank=rank,
                             config=list(cfg) if cfg else "default", ms_total=ms, ms_per_shape=each,
                             gb_per_s=gbps, fraction_of_read_peak=gbps / peak))
        ms, cfg, _ = timed[0]
        if cfg is not None:
            table[plan.tuning_key(case[0], case[1], m)] = list(cfg)
        print(f"sweep m={m} {'/'.join(case):14} best {tuple(cfg) if cfg else 'default'} "
              f"{ms * 1e3:7.1f} us for {len(shapes)} shapes, {nbytes / (ms / 1e3) / 1e9:6.0f} GB/s", flush=True)
        if len(shapes) > 1:
            for name, (own, own_ms, bucket_ms) in _per_shape(runs, timed, shapes).items():
                table[plan.tuning_key(case[0], case[1], m, SHAPES[name])] = list(own)
                rows.append(dict(case="/".join(case), m=m, shapes=[name], rank=0, config=list(own),
                                 ms_total=own_ms, bucket_best_ms=bucket_ms))
                print(f"    {name:10} own best {tuple(own)} {own_ms * 1e3:7.1f} us "
                      f"(the bucket's best: {bucket_ms * 1e3:7.1f} us)", flush=True)
        if on_case:
            on_case(rows, table)
    return rows, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--sweep", action="store_true", help="first time every tile config of our decode kernels")
    p.add_argument("--sweep-budget-s", type=float, default=None,
                   help="with --sweep: start no new case after this many seconds, then compare as usual")
    p.add_argument("--sweep-shapes", default=",".join(SWEEP_SHAPES),
                   help="with --sweep: the weight shapes timed (" + ", ".join(SHAPES) + ")")
    p.add_argument("--sweep-cases", default="", help="with --sweep: only these comma-separated kernel/format "
                   "cases, in this order (" + ", ".join(CASES) + "), each at every --sweep-batches, or "
                   "kernel/format/mN at batch N only; default all")
    p.add_argument("--sweep-batches", default="1,8", help="with --sweep: the batch buckets swept, each case at "
                   "every one before the next case")
    p.add_argument("--tuning-out", type=Path, help="with --sweep: write the best configs as a tuning table "
                   "(codegen/kernels/launch_plan.py) and use it for the comparison that follows")
    p.add_argument("--l2", choices=["cold", "hot"], default="cold",
                   help="cold: every timed call reads its weights from HBM, as a decode step's layers do")
    p.add_argument("--pdl", action="store_true",
                   help="launch effcompile's kernels with programmatic dependent launch (codegen/ops.py) as a "
                        "decode step does; off by default, so a kernel's time includes its launch gap as cuBLAS's "
                        "and TorchAO's do (and as before session 15)")
    p.add_argument("--output", type=Path, required=True)
    a = p.parse_args(argv)
    for field in ("shapes", "sweep_shapes"):
        if unknown := [n for n in getattr(a, field).split(",") if n not in SHAPES]:
            p.error(f"--{field.replace('_', '-')}: unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    try:
        [parse_case(c) for c in a.sweep_cases.split(",") if c]
    except ValueError as e:
        p.error(f"--sweep-cases: {e}")
    if torch.device(a.device).type != "cuda" or not torch.cuda.is_available():
        print("kernels.py times GPU kernels: it needs --device cuda on a machine with a GPU", file=sys.stderr)
        return 2
    import triton

    dtype = getattr(torch, a.dtype)
    L2["mode"] = a.l2
    from effcompile.codegen import ops as cg_ops

    cg_ops.PDL_ENABLED = a.pdl
    copy_peak = copy_bandwidth(a.device)
    peak = read_bandwidth(a.device)
    print(f"device-to-device copy: {copy_peak:.0f} GB/s (read + write); 2 GiB sum: {peak:.0f} GB/s read",
          flush=True)
    torch._dynamo.config.recompile_limit = 256  # one compiled TorchAO linear per shape and format
    swept = None
    rows = []

    def save_sweep(sw: list, table: dict) -> None:
        nonlocal swept
        swept = sw
        if a.tuning_out:
            a.tuning_out.parent.mkdir(parents=True, exist_ok=True)
            a.tuning_out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": a.dtype,
                                                "configs": table}, indent=1))
        write()

    def write() -> None:  # after every phase: a run cut short by its time limit keeps what it measured
        try:
            import torchao

            ao = torchao.__version__
        except Exception:  # noqa: BLE001
            ao = "not installed"
        result = {
            "benchmark": "kernels",
            "device": torch.cuda.get_device_name(),
            "dtype": a.dtype,
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "torchao": ao,
                         "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_peak_gb_per_s": copy_peak,
            "read_peak_gb_per_s": peak,
            "timing": {"method": "CUDA-graph replays (median); L2 " + a.l2 + (
                           ": each call after a read of 4x L2, that read's time subtracted" if a.l2 == "cold"
                           else ": back-to-back calls (do_bench_cudagraph)") +
                           "; triton do_bench (events) where capture failed", "counts": TIMING,
                       "pdl": a.pdl},
            "tuning": str(a.tuning_out) if a.sweep and a.tuning_out else "built-in defaults",
            "rows": rows,
            "sweep": swept,
        }
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(result, indent=1))

    if a.sweep:
        sweep(dtype, a.device, peak, save_sweep, tuple(c for c in a.sweep_cases.split(",") if c) or None,
              a.sweep_budget_s, tuple(a.sweep_shapes.split(",")), tuple(int(b) for b in a.sweep_batches.split(",")))
        if a.tuning_out:
            os.environ[plan.TUNING_ENV] = str(a.tuning_out)
            plan._table.cache_clear()
    write()
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        new = bench_shape(name, n, k, [int(b) for b in a.batches.split(",")], dtype, a.device, peak,
                          not a.no_torchao)
        rows += new
        for r in new:
            what = r.get("failed") or f"{r['ms'] * 1e3:8.1f} us {r['gb_per_s']:7.0f} GB/s " \
                                       f"x{r.get('speedup_vs_dense', 0):.2f} vs dense"
            print(f"{name:8} m={r['m']:<3} {r['variant']:22} {what}", flush=True)
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
