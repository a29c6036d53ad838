"""CPU int4 decode GEMV that reads only the weight rows of kept inputs: a small C kernel, built on first use.

Sparse activations x int4 weights on the CPU. torch has no kernel for the pair: its packed int4 matmul
(_weight_int4pack_mm_for_cpu) reads every weight row, and FBGEMM's 4-bit embedding bag, which does skip rows,
converts codes at ~9 GB/s even from cache, slower at 50 % kept than the packed matmul over all rows (session 24,
2048 x 16384, one row: 1.6-3.7 ms against 0.9-1.3). This kernel, cpu_int4_gemv.c, is ~150 lines of C with
AVX-512 intrinsics where the CPU has them (plain loops otherwise), built by codegen/native.py (the system C
compiler, the effcompile cache directory) and checked against the reference before first use.

Layout (``pack``, from sparse_linear's input-major packed int4 [K, N/2] and its [G, N] scales / zeros):
  panels [P, K, 128] uint8, P = ceil(N / 256): each input's 256 codes of one panel in 128 contiguous bytes, so
         a kept input costs two cache lines per panel and a panel is one sequential region of K * 128 bytes.
         Inside the 128 bytes: two halves of 16 dwords; nibble n of dword l in half h is output
         h*128 + n*16 + l, so 16 outputs come out of one 512-bit load with a shift and a mask.
  sz     [P, G, 2, 256], bf16 when the scales and zeros are bf16, else fp32: each panel's scales then zeros.
The threshold test, the kept-input lists and the group sums all run in one call (no torch ops in between).
Kept rows are prefetched 16 ahead: random kept rows defeat the hardware prefetcher, and without it the kernel
waited on memory (50 % kept: 1.22 -> 0.70 ms, 2048 x 16384 from DRAM).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from effcompile.codegen import native
from effcompile.codegen import ops as _ops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler import sparse_ops

NAME = "int4_gemv"  # the custom op (effcompile::int4_gemv) and its PATH_COUNTS key
OUTS = 256  # outputs per panel (the C kernel's OUTS)
ROW_BYTES = 128
SOURCE = Path(__file__).with_suffix(".c")
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
             ctypes.c_int]


def unavailable() -> str | None:
    """None when the C kernel is built, loaded and agrees with the reference here, else why not."""
    return KERNEL.unavailable()


def pack(weight_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_linear's input-major int4 (weight_t [K, N/2], scales / zeros [G, N]) -> (panels, sz) as above."""
    k, n = weight_t.shape[0], 2 * weight_t.shape[1]
    p = -(-n // OUTS)
    codes = torch.zeros(k, p * OUTS, dtype=torch.uint8)
    codes[:, :n] = torch.stack((weight_t & 0xF, weight_t >> 4), -1).view(k, n)
    c = codes.view(k, p, 2, 4, 2, 16)  # [k, panel, half, byte b, nibble of the byte, dword l]
    panels = (c[..., 0, :] | (c[..., 1, :] << 4)).transpose(-1, -2).reshape(k, p, ROW_BYTES).transpose(0, 1)
    zeros = torch.zeros_like(scales) if zeros is None else zeros
    dt = torch.bfloat16 if scales.dtype == zeros.dtype == torch.bfloat16 else torch.float32
    sz = torch.zeros(scales.shape[0], 2, p * OUTS, dtype=dt)
    sz[:, 0, :n], sz[:, 1, :n] = scales, zeros
    return panels.contiguous(), sz.view(-1, 2, p, OUTS).permute(2, 0, 1, 3).contiguous()


def unpack(panels: torch.Tensor, sz: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``pack``: (codes [K, N] uint8, scales [G, N] fp32, zeros [G, N] fp32)."""
    p, k, _ = panels.shape
    b = panels.transpose(0, 1).reshape(k, p, 2, 16, 4).transpose(-1, -2)  # [k, panel, half, byte, dword]
    codes = torch.stack((b & 0xF, b >> 4), -2).reshape(k, p * OUTS)[:, :n]
    s = sz.float().permute(1, 2, 0, 3).reshape(sz.shape[1], 2, p * OUTS)[..., :n]
    return codes, s[:, 0], s[:, 1]


def _dense(x2: torch.Tensor, panels, sz, n: int, group: int) -> torch.Tensor:
    """Dequantize and multiply, the reference's numerics (sparse_linear.rows_of): only where the kernel is missing."""
    codes, s, z = unpack(panels, sz, n)
    g = torch.arange(codes.shape[0]) // group
    return x2 @ (codes.float() * s[g] + z[g]).to(x2.dtype)


def _call(fn, x2: torch.Tensor, threshold: torch.Tensor | None, panels, sz, n: int, group: int) -> torch.Tensor:
    m, k = x2.shape
    xf = x2.float().contiguous()
    thr, stride = native.threshold_arg(threshold, x2.dtype)
    y = torch.empty(m, n, dtype=torch.float32)
    kept = fn(xf.data_ptr(), m, k, None if thr is None else thr.data_ptr(), stride,
              panels.data_ptr(), sz.data_ptr(), int(sz.dtype == torch.bfloat16), panels.shape[0], group,
              y.data_ptr(), n, torch.get_num_threads())
    if kept < 0:
        raise MemoryError(f"{NAME}: the C kernel could not allocate its kept-input lists ({m} x {k})")
    return y


def run(x, threshold, panels, sz, bias, n: int, group: int, label: str, decode_only: bool) -> torch.Tensor:
    """threshold None: a dense int4 linear (exact zeros still skip their rows); else sparse_linear's semantics."""
    applied = threshold is not None and not (decode_only and sparse_ops.is_prefill(x))
    x2 = x.reshape(-1, x.shape[-1])
    if applied and sparse_ops.measuring():
        sparse_ops.record(label, sparse_ops.keep_mask(x, threshold), x.numel())
    # Every row count takes the kernel: prefill too (50 rows of 2048 x 16384: 15.1 ms, torch's packed int4 matmul
    # 19.3; the dequantize + matmul below 222 ms, the path only for a graph loaded where the kernel cannot build).
    if x2.numel() and unavailable() is None:
        y, path = _call(KERNEL.fn, x2, threshold if applied else None, panels, sz, n, group).to(x.dtype), "kernel"
    else:
        xs = torch.where(sparse_ops.keep_mask(x2, threshold), x2, 0) if applied else x2
        y, path = _dense(xs, panels, sz, n, group), "dense"
    _ops.count(NAME, path)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def _self_check(fn) -> None:
    """Odd shapes (a partial last panel, two groups), each threshold form, both scale dtypes and each row path (rows
    one at a time; a block of 4 rows keeping the same inputs) vs ``_dense``."""
    gen = torch.Generator().manual_seed(0)
    k, n, group = 64, 300, 32
    wt = torch.randint(0, 256, (k, n // 2), dtype=torch.uint8, generator=gen)
    x = torch.randn(7, k, generator=gen)  # 1, 2 and 7 rows: 7 unthresholded is a block of 4 and 3 single rows
    x[0, :5] = 0
    for dt in (torch.float32, torch.bfloat16):
        s = (torch.rand(k // group, n, generator=gen) * 0.1).to(dt)
        z = torch.randn(k // group, n, generator=gen).to(dt) * 0.1
        panels, sz = pack(wt, s, z)
        for thr in (None, torch.tensor(0.5), torch.rand(k, generator=gen)):
            for m in (1, 2, 7):
                xs = x[:m] if thr is None else torch.where(x[:m].abs() > thr, x[:m], 0)
                want, got = _dense(xs, panels, sz, n, group), _call(fn, x[:m], thr, panels, sz, n, group)
                err = (got - want).abs().max().item()
                if not err <= 1e-4 * max(1.0, want.abs().max().item()):
                    raise RuntimeError(f"kernel disagrees with the reference (max err {err:.3g}, scales {dt}, "
                                       f"threshold {None if thr is None else tuple(thr.shape)}, {m} rows)")


KERNEL = native.Kernel("CPU int4 GEMV", SOURCE, "ec_int4_gemv", _ARGTYPES, ctypes.c_int64, _self_check,
                       "int4 sparse linears fall back to slower paths")
sl.CPU_INT4_PROBE[:] = [unavailable]

if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, threshold: torch.Tensor | None, panels: torch.Tensor, sz: torch.Tensor,
           bias: torch.Tensor | None, n: int, group: int, label: str, decode_only: bool) -> torch.Tensor:
        return run(x, threshold, panels, sz, bias, n, group, label, decode_only)

    @op.register_fake
    def _fake(x, threshold, panels, sz, bias, n, group, label, decode_only):
        return x.new_empty((*x.shape[:-1], n))
