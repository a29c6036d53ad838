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
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]


def unavailable() -> str | None:
    """None when the C kernel is built, loaded and agrees with the reference here, else why not."""
    return KERNEL.unavailable()


def call(x: torch.Tensor, threshold: torch.Tensor | None, rows: torch.Tensor, max_kept: int,
         fn=None) -> torch.Tensor | None:
    """x [K] or [1, K] (any float dtype) @ rows [K, N] fp32 over the inputs kept (|x| > threshold, or x != 0 without
    one), in fp32; None (nothing computed) when more than ``max_kept`` inputs are kept."""
    fn = fn or KERNEL.fn
    k, n = rows.shape
    xf = x.reshape(k).float().contiguous()
    thr, stride = native.threshold_arg(threshold, x.dtype)
    y = torch.empty(n, dtype=torch.float32)
    kept = fn(xf.data_ptr(), k, None if thr is None else thr.data_ptr(), stride,
              rows.data_ptr(), n, y.data_ptr(), torch.get_num_threads(), max_kept)
    if kept < 0:
        raise MemoryError(f"cpu_float_gemv: the C kernel could not allocate its kept-input list ({k} inputs)")
    return None if kept > max_kept else y


def _self_check(fn) -> None:
    """Odd shapes (slabs that do not divide N), each threshold form and the kept-share cut-off vs torch."""
    gen = torch.Generator().manual_seed(0)
    for k, n in ((70, 37), (256, 2500)):
        rows = torch.randn(k, n, generator=gen)
        x = torch.randn(k, generator=gen)
        x[:5] = 0
        for thr in (None, torch.tensor(0.5), torch.rand(k, generator=gen)):
            keep = x != 0 if thr is None else x.abs() > thr
            want = torch.where(keep, x, 0) @ rows
            got = call(x, thr, rows, k, fn)
            err = (got - want).abs().max().item()
            if not err <= 1e-4 * max(1.0, want.abs().max().item()):
                raise RuntimeError(f"kernel disagrees with the reference (max err {err:.3g}, {k}x{n})")
            if call(x, thr, rows, int(keep.sum()) - 1, fn) is not None:
                raise RuntimeError("kernel ignored its kept-input limit")


KERNEL = native.Kernel("CPU float GEMV", SOURCE, "ec_float_gemv", _ARGTYPES, ctypes.c_int64, _self_check,
                       "fp32 sparse linears use torch's embedding bag")
