"""CPU one-row GEMV over an fp32 input-major weight that reads only the rows of kept inputs: a small C kernel.

cpu_bag_gemv runs it in place of torch's float embedding bag for one activation row and fp32 weights, on the same
buffer. FBGEMM's bag walks its output in register-sized blocks, one pass over all of a bag's rows per block, so
even cut into 32-input bags it reads short strided runs; this kernel gives each thread a slab of at most 1024
outputs accumulated in L1 and reads each kept row's segment once, contiguously (cpu_float_gemv.c). Session 24,
Llama-3.2-1B shapes, one row at 50 % sparsity, from DRAM: q/k/v 0.77 -> 0.68 ms, o 0.56 -> 0.37, gate/up 3.0 ->
2.8, down 2.0 -> 1.45 against the 32-input bags (dense sgemv 0.88 / 0.59 / 4.5 / 2.2). With every input kept it
is ~1.25x slower than sgemv, so the bag module's kept-share limit (FLOAT_BAG_MAX_KEPT) still sends such calls to
the dense matmul. bf16 / fp16 weights keep the bag, which was as fast or faster there (gate/up 1.45 vs 1.68 ms).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from effcompile.codegen import native

SOURCE = Path(__file__).with_suffix(".c")
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C kernel's wtype codes
MAX_ROWS = 8


def unavailable() -> str | None:
    """None when the C kernel is built, loaded and agrees with the reference here, else why not."""
    return KERNEL.unavailable()


def call(x: torch.Tensor, threshold: torch.Tensor | None, rows: torch.Tensor, max_kept: int,
         fn=None) -> torch.Tensor | None:
    """x [M, K] (M <= 8, any float dtype) @ rows [K, N] (fp32 / bf16 / fp16) over the inputs kept (|x| > threshold,
    or x != 0 without one), in fp32 [M, N]; None (nothing computed) when more than ``max_kept`` inputs are kept by some row."""
    fn = fn or KERNEL.fn
    k, n = rows.shape
    xf = x.reshape(-1, k).float().contiguous()
    m = xf.shape[0]
    if not 1 <= m <= MAX_ROWS or rows.dtype not in WEIGHT_TYPES or not rows.is_contiguous():
        raise ValueError(f"cpu_float_gemv takes 1-{MAX_ROWS} rows and contiguous {list(WEIGHT_TYPES)} weights, "
                         f"got {m} rows of {rows.dtype}")
    thr, stride = native.threshold_arg(threshold, x.dtype)
    y = torch.empty(m, n, dtype=torch.float32)
    kept = fn(xf.data_ptr(), m, k, None if thr is None else thr.data_ptr(), stride, rows.data_ptr(),
              WEIGHT_TYPES[rows.dtype], n, y.data_ptr(), torch.get_num_threads(), max_kept)
    if kept < 0:
        raise MemoryError(f"cpu_float_gemv: the C kernel could not allocate its kept-input list ({k} inputs)")
    return None if kept > max_kept else y


def _self_check(fn) -> None:
    """Odd shapes (slabs that do not divide N, blocks that do not divide the kept inputs), 1 / 3 / 8 rows, each
    weight dtype and threshold form, and the kept-input cut-off, vs torch."""
    gen = torch.Generator().manual_seed(0)
    for (k, n), m, dtype in (((70, 37), 1, torch.float32), ((256, 2500), 1, torch.float32),
                             ((70, 37), 3, torch.bfloat16), ((129, 300), 8, torch.float16)):
        rows = torch.randn(k, n, generator=gen).to(dtype)
        x = torch.randn(m, k, generator=gen)
        x[:, :5] = 0
        for thr in (None, torch.tensor(0.5), torch.rand(k, generator=gen)):
            keep = x != 0 if thr is None else x.abs() > thr
            want = torch.where(keep, x, 0) @ rows.float()
            got = call(x, thr, rows, k, fn)
            err = (got - want).abs().max().item()
            if not err <= 1e-4 * max(1.0, want.abs().max().item()):
                raise RuntimeError(f"kernel disagrees with the reference (max err {err:.3g}, {m}x{k}x{n} {dtype})")
            if call(x, thr, rows, int(keep.any(0).sum()) - 1, fn) is not None:
                raise RuntimeError("kernel ignored its kept-input limit")


KERNEL = native.Kernel("CPU float GEMV", SOURCE, "ec_float_gemv", _ARGTYPES, ctypes.c_int64, _self_check,
                       "float sparse linears use torch's embedding bag")
