"""CPU GEMV of 1-8 activation rows over an input-major float weight (fp32 / bf16 / fp16) or int8 codes, reading only the
weight rows of inputs some row keeps: a small C kernel (cpu_float_gemv.c) that cpu_bag_gemv runs on its float / int8
buffers (int8: the byte rows as they are, codes + 128; cpu_bag_gemv applies the per-output scales after).

Why not torch's float embedding bag: FBGEMM's bag walks its output in register-sized blocks, one pass over all of a
bag's rows per block, so it reads short strided runs; with several activation rows each row is its own bag and
re-reads the weight rows; its bf16 / fp16 output rounds every partial sum. And the dense alternative, the matmul of
the input-major weight, is a slow path in torch for half weights and for fp32 with several rows. The kernel reads
each needed weight row once for all activation rows (the union of their kept inputs; a row that does not keep an
input multiplies it by 0) and sums in fp32:
  one fp32 row: 4 kept rows a step along a slab of <= 1024 outputs accumulated in L1 (session 24's loop);
  otherwise: register tiles of rows x up to 8 vectors of outputs over chunks of 16 kept rows held in L2, each weight
  converted once for all rows (session 25; for one bf16 row it beat the L1 loop by 5-15 %, for one fp32 row it lost
  10-20 %).
Per call, Llama-3.2-1B shapes, weights from DRAM, 2-core box (session 25, benchmarks/results/sparse-cpu-1b-stream-*-s25):
  bf16 at 50 %, vs the dense F.linear: 1.5-2.4x at 1 row, 1.08-1.49x at 2, 0.96-1.17x at 4, 0.81-1.06x at 8; vs
  what ran before (the bag to 4 rows, then the input-major matmul) 1.09-1.37x at 1 row, 1.64-1.84x at 8.
  fp32, every input kept: 0.81-0.84x sgemv at 1 row (so one fp32 row past FLOAT_BAG_MAX_KEPT still runs sgemv),
  but at 8 rows 1.85-2.8x torch's F.linear and 1.6-1.7x the input-major sgemm (torch's fp32 GEMM at 8 rows is slow here).
  int8 codes, bf16 x, alternating in one process (two runs): every input kept, 1 row 1.1-2.9x torch's packed int8
  matmul, 8 rows 1.2-1.9x (about the bf16 F.linear's time: the conversions bound it there); 50 % kept, 1 row 1.3-1.5x
  FBGEMM's byte bag. fp32 x: 1.4-2.1x the byte bag at 1 row, 1.85-3.1x at 8. The streaming files
  (sparse-cpu-1b-stream-*int8-2026-11-28-s25.json) time each path in turn and moved more between runs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from effcompile.codegen import native

SOURCE = Path(__file__).with_suffix(".c")
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
# The C kernel's wtype codes; uint8: int8 codes stored + 128, cpu_bag_gemv's int8 rows (their scale tail not read)
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}
MAX_ROWS = 8


def unavailable() -> str | None:
    """None when the C kernel is built, loaded and agrees with the reference here, else why not."""
    return KERNEL.unavailable()


def call(x: torch.Tensor, threshold: torch.Tensor | None, rows: torch.Tensor, max_kept: int,
         fn=None, n: int | None = None) -> torch.Tensor | None:
    """x [M, K] (M <= 8, any float dtype) @ rows [K, N] (fp32 / bf16 / fp16, or uint8 int8-codes + 128, whose first
    ``n`` columns are the codes) over the inputs kept (|x| > threshold, or x != 0 without one), in fp32 [M, N] (int8:
    in code units, unscaled); None (nothing computed) when more than ``max_kept`` inputs are kept by some row."""
    fn = fn or KERNEL.fn
    k, stride = rows.shape
    n = stride if n is None else n
    xf = x.reshape(-1, k).float().contiguous()
    m = xf.shape[0]
    if not 1 <= m <= MAX_ROWS or rows.dtype not in WEIGHT_TYPES or not rows.is_contiguous() or not 0 <= n <= stride:
        raise ValueError(f"cpu_float_gemv takes 1-{MAX_ROWS} rows and contiguous {list(WEIGHT_TYPES)} weights of at "
                         f"least n columns, got {m} rows of {rows.dtype} {list(rows.shape)}, n={n}")
    thr, thr_stride = native.threshold_arg(threshold, x.dtype)
    y = torch.empty(m, n, dtype=torch.float32)
    kept = fn(xf.data_ptr(), m, k, None if thr is None else thr.data_ptr(), thr_stride, rows.data_ptr(),
              WEIGHT_TYPES[rows.dtype], n, stride, y.data_ptr(), torch.get_num_threads(), max_kept)
    if kept == -1:
        raise MemoryError(f"cpu_float_gemv: the C kernel could not allocate its buffers ({m}x{k} inputs, {n} outputs)")
    if kept < 0:
        raise RuntimeError(f"cpu_float_gemv: the C kernel refused its arguments (code {kept})")
    return None if kept > max_kept else y


def _self_check(fn) -> None:
    """Odd shapes (slabs that do not divide N, blocks and chunks that do not divide the kept inputs), 1, 2, 3 and 8
    rows (both loops), each weight type and threshold form, and the kept-input cut-off, vs torch."""
    gen = torch.Generator().manual_seed(0)
    for (k, n), m, dtype in (((70, 37), 1, torch.float32), ((256, 2500), 1, torch.float32),
                             ((70, 37), 3, torch.bfloat16), ((129, 300), 8, torch.float16), ((70, 37), 2, torch.uint8)):
        rows = torch.randn(k, n, generator=gen).to(dtype) if dtype != torch.uint8 else \
            torch.randint(0, 256, (k, n + 8), dtype=torch.uint8, generator=gen)
        x = torch.randn(m, k, generator=gen)
        x[:, :5] = 0
        for thr in (None, torch.tensor(0.5), torch.rand(k, generator=gen)):
            keep = x != 0 if thr is None else x.abs() > thr
            want = torch.where(keep, x, 0) @ (rows[:, :n].float() - 128 if dtype == torch.uint8 else rows.float())
            got = call(x, thr, rows, k, fn, n)
            err = (got - want).abs().max().item()
            if not err <= 1e-4 * max(1.0, want.abs().max().item()):
                raise RuntimeError(f"kernel disagrees with the reference (max err {err:.3g}, {m}x{k}x{n} {dtype})")
            if call(x, thr, rows, int(keep.any(0).sum()) - 1, fn, n) is not None:
                raise RuntimeError("kernel ignored its kept-input limit")


KERNEL = native.Kernel("CPU float GEMV", SOURCE, "ec_float_gemv", _ARGTYPES, ctypes.c_int64, _self_check,
                       "float sparse linears use torch's embedding bag")
