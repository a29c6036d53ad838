"""Sparse-activation GEMV (decode, 1-8 rows): threshold the input and read only the weight rows still needed;
past 8 rows, for int4 / int8 weights, the same kernel as a GEMM over M tiles (prefill). This module holds the
launcher, the dense rule and the custom op; the kernel is sparse_kernel.py.
"""

from __future__ import annotations

import torch
import triton

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.codegen.kernels.sparse_kernel import _sparse_kernel  # its name shows in GPU profiles
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler import sparse_ops

NAME = "sparse_gemv"  # the custom op (effcompile::sparse_gemv) and its PATH_COUNTS key
_FMT = {"int8": 0, "int4": 1, "float": 2}
COMPACT_SEGMENT = 128  # channels compacted at a time by one-row float / int8 launches (int4: its group)
FLAT_SEGS = 8  # segments a Config.flat launch compacts per step, at most
FLAT_TAIL = 8  # chunks of -1 after a flat launch's list, the kernel's TAIL: reads past it reach at most 6 (PREFETCH 4)
# Rows up to which a masked launch skips the weight rows no activation row keeps (SKIP_ROWS); past it every row is
# read and only x thresholded. At 50 % random sparsity 3 rows need 88 % of the rows, 8 rows 99.6 %, and the keep
# reduction across rows costs more (sm_90 SASS at 8 rows, triton 3.6: loop instructions int8 1005 -> 789, int4
# 560 -> 401, float 414 -> 249 without it, no shuffles; untimed).
SKIP_ROWS_MAX = 2


def supported(x: torch.Tensor, weight_t: torch.Tensor, fmt: str, decode_only: bool) -> str | None:
    """None when the kernel takes this call, else why the eager path runs instead (the dense rule). Past
    DECODE_MAX_ROWS, or for a prefill with decode_only thresholds, quantized weights run launch's GEMM (the eager
    path would dequantize the whole weight per call); float ones the eager cuBLAS matmul."""
    if fmt not in _FMT:
        return f"no sparse kernel for format {fmt!r}"
    if x.dtype not in plan.DOT_DTYPES:
        return f"activation dtype {x.dtype} is not fp32/fp16/bf16"
    if fmt == "float" and decode_only and sparse_ops.is_prefill(x):
        return "prefill input with decode_only thresholds: dense path"
    rows = x.numel() // max(x.shape[-1], 1)
    if fmt == "float" and rows > sl.DECODE_MAX_ROWS:
        return f"{rows} rows > {sl.DECODE_MAX_ROWS}: every weight row is needed, dense path"
    return None


def launch(x, threshold, weight_t, scales, zeros, bias, fmt: str, group_size: int,
           split_k: int | None = None, config: plan.Config | None = None, epilogue: str = "none",
           thresholded: bool = True, gemm: bool | None = None) -> torch.Tensor:
    """Run the kernel on x [..., K]; the result is [..., N] in x's dtype, or [..., N / 2] with epilogue
    "silu_mul" (compiler/ops.py EPILOGUES), applied in the kernel's store. A decode GEMV up to DECODE_MAX_ROWS
    rows, else a GEMM: M tiles along the grid's third axis, one K split, dot tiles; also with ``thresholded``
    False (x as it is: a prefill with decode_only thresholds).
    split_k forces the K split (tests); config overrides the tile shape (benchmarks/kernels.py --sweep); gemm=True
    runs the GEMM at any row count (benchmarks/kernels.py times it against the GEMV at 3-8 rows)."""
    k = x.shape[-1]
    n = weight_t.shape[1] * (2 if fmt == "int4" else 1)
    if epilogue not in qops.EPILOGUES or (epilogue != "none" and n % 2):
        raise ValueError(f"epilogue={epilogue!r} with N={n}: the epilogues are {qops.EPILOGUES}, on an even N")
    width = n // 2 if epilogue != "none" else n
    dev = x.device
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if gemm is None:
        gemm = m > sl.DECODE_MAX_ROWS or not thresholded  # only the GEMM's path has the unthresholded branch
    if not (m and n):
        return torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=dev)
    t = _ops.on_device(threshold, dev, f"{NAME} threshold").float()
    w = _ops.on_device(weight_t, dev, f"{NAME} weight")
    s = _ops.on_device(scales, dev, f"{NAME} scales") if scales is not None else t  # placeholders: float
    z = _ops.on_device(zeros, dev, f"{NAME} zeros") if zeros is not None else s
    b = _ops.on_device(bias, dev, f"{NAME} bias") if bias is not None else t
    interp = _ops.interpreting(dev)
    if gemm:  # the decode tables' buckets do not cover it: the matmuls' prefill tile, no K split (untimed here)
        bm, bn, bk, warps, stages, split_k = plan.matmul_tiles(max(m, plan.GEMV_MAX_M + 1), fmt, x.dtype)
        bn = 128 if fmt == "int4" else bn  # 128 int4 outputs: a weight row's load is 64 contiguous bytes
        config = None
    else:
        config = config if config is not None else plan.tuned("sparse", fmt, m, x.dtype, dev, (n, k))
        bn, bk, warps, stages = config[:4] if config is not None else plan.sparse_config(fmt, x.dtype)
        bm = plan.block_m(m, config)
    if fmt == "int4":
        bk = min(bk, group_size)  # one group per K chunk: the kernel scales each chunk's partial sums
    if config is not None and split_k is None:
        split_k = config.splits
    fma = plan.uses_fma(m, config)
    # Compact one-row fma launches (Config.compact; the kernel's COMPACT): K split at segment boundaries (an
    # int4 group; 128 channels otherwise), int4 read as int32 words of 8 outputs (N % 8 == 0).
    compact = plan.compacts(m, config) and (
        fmt != "int4" or (n % 8 == 0 and w.is_contiguous() and w.storage_offset() % 4 == 0))
    seg = group_size if fmt == "int4" else COMPACT_SEGMENT
    tiles = triton.cdiv(n, bn)
    ks = plan.k_split(tiles, k, seg if compact else bk, dev, split_k)
    # Axis 2 tiles M (gemm); the epilogue's split-K fixup counts tiles by pid_n alone, so gemm never splits K.
    grid = (tiles, triton.cdiv(k, ks), triton.cdiv(m, bm) if gemm else 1)
    out = torch.empty((m, width), dtype=x.dtype, device=dev)
    split = plan.SPLIT_FIXUP if ks < k else plan.SPLIT_NONE
    ws, cnt = plan.split_workspace(m, n, tiles, dev) if split else (t, t)
    # Config.flat: the whole split compacted up front into one list of ks entries (ks is whole segments), SEGS
    # segments at a time (at most FLAT_SEGS: one [SEGS, SEG] tile of x per step).
    flat = compact and bool(config.flat)
    segs = min(triton.next_power_of_2(ks // seg), FLAT_SEGS) if flat else 1
    if compact:
        w = w.view(torch.int32) if fmt == "int4" else w
        lists = plan.scratch_lists(grid[0] * grid[1] * (ks + FLAT_TAIL * bk if flat else 2 * seg), dev)
    else:
        lists = cnt  # unused placeholder
    dot_dt = plan.dot_dtype(x.dtype, interp)
    i4_bits, i4_off = plan.int4_offset(dot_dt)
    # Register double buffering (the kernel's PREFETCH): compacted launches, and one-row float / int8 fma ones
    # (the masked path), with stages >= 2; triton's own pipeliner only stages loads that feed a tl.dot.
    # A flat launch prefetches stages - 1 chunks ahead (at most 4).
    prefetch = min(stages - 1, 4) if flat else int(stages >= 2 and (compact or (fma and m == 1 and fmt != "int4")))
    # stages >= 3 on a per-segment compacted launch: the kept-row indices two chunks ahead as well (IDX_AHEAD).
    _ops.jit_variant(_sparse_kernel, interp)[grid](
        x2, t, w, s, z, b, out, ws, cnt, lists, m, n, k, ks, grid[1], FMT=_FMT[fmt], G=max(group_size, 1),
        PER_CHANNEL=t.numel() > 1, HAS_BIAS=bias is not None, DOT_DT=dot_dt, I4_BITS=i4_bits, I4_OFF=i4_off,
        I4_ASM=plan.int4_asm(dot_dt, interp), SPLIT=split, FMA=fma, COMPACT=compact, SEG=seg, PREFETCH=prefetch,
        IDX_AHEAD=compact and not flat and stages >= 3, FLAT=flat, SEGS=segs, TAIL=FLAT_TAIL * bk,
        EPILOGUE=int(epilogue != "none"), THRESHOLD=thresholded, SKIP_ROWS=m <= SKIP_ROWS_MAX,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1 if compact or prefetch else stages,
        **_ops.launch_options(dev))
    return out.view(*x.shape[:-1], width)


def run(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only, mode: int = 0,
        epilogue: str = "none"):
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton where supported), 1: Triton, 2: eager path."""
    if _ops.use_triton(mode, x.device) and supported(x, weight_t, fmt, decode_only) is None:
        thresholded = not (decode_only and sparse_ops.is_prefill(x))
        if thresholded and sparse_ops.measuring():  # the kernel does not count; count here only when asked to
            sparse_ops.record(label, sparse_ops.keep_mask(x, threshold), x.numel())
        out = launch(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, epilogue=epilogue,
                     thresholded=thresholded)
        path = "triton"
    else:
        out, path = qops.apply_epilogue(sl.sparse_linear_eager(x, threshold, weight_t, scales, zeros, bias, fmt,
                                                               group_size, label, decode_only), epilogue), "torch"
    _ops.count(NAME, path)
    return out


def reference(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label="", decode_only=False):
    return sl.reference(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only)


def kind_for(rows: int | None, fmt: str = "float") -> str:
    """explain()'s kernel kind: the GEMV up to DECODE_MAX_ROWS rows; past it a GEMM for quantized weights, the
    eager matmul (dense) for float ones; "a|b" when the rows are not static (either, by the call's rows)."""
    if rows is not None and rows <= sl.DECODE_MAX_ROWS:
        return "sparse-gemv"
    many = "dense" if fmt == "float" else "sparse-gemm"
    return many if rows is not None else "sparse-gemv|" + many


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, threshold: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor | None,
           zeros: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, group_size: int, label: str,
           decode_only: bool, mode: int, epilogue: str = "none") -> torch.Tensor:
        return run(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only, mode, epilogue)

    @op.register_fake
    def _fake(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only, mode, epilogue="none"):
        n = weight_t.shape[1] * (2 if fmt == "int4" else 1)
        return x.new_empty((*x.shape[:-1], n // (1 if epilogue == "none" else 2)))
