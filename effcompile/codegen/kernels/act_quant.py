"""Dynamic per-token activation quantization in Triton: a row-quantize kernel and the W8A8 int8 x int8 -> int32 GEMM."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import epilogue as _epilogue
from effcompile.codegen.kernels import launch_plan as plan

_ACT = {"int8": 0, "fp8": 1}
ROW_BLOCK = 256  # K elements a row-quantize program reads per step

# Interpreter rules as in codegen/README.md: tl builtins and tl.reduce with triton's own combine fns.
#
# Matching compiler/ops.quantize_activation bit for bit:
# - divisions use tl.math.div_rn (correctly rounded, like torch's CPU division); a plain `/` on the GPU is
#   div.full.f32 (2 ulp), which would move codes that sit near a rounding boundary. (torch on CUDA itself
#   multiplies by the reciprocal of a scalar divisor, so there a token scale can differ from ours by 1 ulp.)
# - round-half-to-even (torch.round) by the magic-number trick (y + 1.5 * 2**23) - 1.5 * 2**23, exact for
#   |y| < 2**22 in fp32 and runnable by the interpreter (libdevice.rint is not, when TRITON_INTERPRET was
#   set after import).
# - fp32 -> e4m3 rounding is done on the bits, not with `.to(tl.float8e4nv)`: the triton 3.9 interpreter's
#   fp8 downcast loses the mantissa carry into the exponent (125.2 became 64, torch gives 128), so the
#   cast cannot be tested here. Upcasting e4m3 -> fp32/fp16/bf16 is exact there for all 254 finite codes.
# (12582912.0 below is 1.5 * 2**23; a module constant would have to be a tl.constexpr global.)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, s_ptr, K, ACT: tl.constexpr, FAKE: tl.constexpr, BF16: tl.constexpr,
                          BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _ops.wait_for_producers(PDL)  # first: with PDL, nothing may read another kernel's output before it
    # One program per row: pass 1 finds the row's absmax, pass 2 writes the codes (int8), or with FAKE the
    # values they stand for (codes * scale in x's dtype, what ops.fake_quantize_activation returns).
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * K
    amax = tl.full((BLOCK_K,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.reduce(amax, 0, tl.standard._elementwise_max)
    if ACT == 0:
        s = tl.maximum(tl.math.div_rn(a, 127.0), 1e-12)
    else:
        s = tl.maximum(tl.math.div_rn(a, 448.0), 1e-12)
    tl.store(s_ptr + pid, s)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row + offs, mask=offs < K, other=0.0).to(tl.float32)
        y = tl.math.div_rn(v, s)
        if ACT == 0:
            r = tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, -127.0), 127.0)
        else:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            # Normal e4m3 (|y| >= 2**-6): round the fp32 mantissa to 3 bits, half to even, on the bits
            # (a carry rolls into the exponent, as it should). Subnormal e4m3: a fixed 2**-9 grid.
            bits = y.to(tl.int32, bitcast=True)
            norm = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
            sub = ((y * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
            r = tl.where(tl.abs(y) < 0.015625, sub, norm)
        if FAKE:
            f = r * s
            if BF16:
                # Round to bf16 half to even on the bits: the interpreter's fp32 -> bf16 cast truncates (the
                # GPU's rounds; this is exact there too, the cast below then has nothing left to round).
                fb = f.to(tl.int32, bitcast=True)
                f = ((fb + 0x7FFF + ((fb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            tl.store(out_ptr + row + offs, f.to(out_ptr.dtype.element_ty), mask=offs < K)
        else:
            tl.store(out_ptr + row + offs, r.to(out_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows(x: torch.Tensor, act: str, fake: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes, fp32 scales [..., 1]) as ops.quantize_activation; with ``fake`` the codes are
    dequantized in x's dtype (ops.fake_quantize_activation). int8 codes are int8; fp8 codes come back as
    their fp32 values (only the fake form is used by the kernels)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, k), dtype=x.dtype if fake else (torch.int8 if act == "int8" else torch.float32),
                      device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and k:
        _ops.jit_variant(_quantize_rows_kernel, _ops.interpreting(x.device))[(m,)](
            x2, out, s, k, ACT=_ACT[act], FAKE=fake, BF16=fake and x.dtype == torch.bfloat16, BLOCK_K=min(ROW_BLOCK, triton.next_power_of_2(k)),
            **_ops.launch_options(x.device))
    return out.view(x.shape), s.view(*x.shape[:-1], 1)


@triton.jit
def _w8a8_kernel(xq_ptr, sx_ptr, q_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, K_SPLIT, SPLITS,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    _ops.wait_for_producers(PDL)  # first: with PDL, nothing may read another kernel's output before it
    # int8 activation codes x int8 weight codes on the integer tensor cores, exact int32 sums; then
    # sum * token scale * channel scale (+ bias) in fp32, in ops._w8a8's order. Split-K as in
    # dequant_matmul: each split rescales its own partial sum and adds it atomically (fp32) into the
    # self-cleaning workspace (launch_plan.split_workspace); the last split of a tile stores the output.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row = offs_m.to(tl.int64)[:, None] * K
    col = offs_n.to(tl.int64)[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(xq_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(q_ptr + col * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(x, w, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * s[None, :]
    if HAS_BIAS:
        first = (offs_n * 0 + k_lo) == 0  # a tensor: the interpreter refuses a scalar bool in a mask
        b = tl.load(b_ptr + offs_n, mask=n_mask & first, other=0.0).to(tl.float32)  # added by split 0 only
        y += b[None, :]
    _epilogue.finish(y, out_ptr, ws_ptr, cnt_ptr, pid_m, pid_n, offs_m, offs_n, m_mask,
                     n_mask, N, SPLITS, SPLIT, 0, BLOCK_M, BLOCK_N)


def w8a8(x, qweight, scales, bias, split_k: int | None = None, config: plan.Config | None = None) -> torch.Tensor:
    """W8A8 linear: x [..., K] quantized per token (quantize_rows), times int8 per-channel weights [N, K]."""
    k, n = x.shape[-1], qweight.shape[0]
    dev = x.device
    m = x.numel() // k if k else 0
    if not (m and n):
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=dev)
    xq, sx = quantize_rows(x.reshape(m, k), "int8")
    q, s = _ops.on_device(qweight, dev, "w8a8 weight"), _ops.on_device(scales, dev, "w8a8 scales")
    b = _ops.on_device(bias, dev, "w8a8 bias") if bias is not None else s
    if config is None and m <= plan.GEMV_MAX_M:
        config = plan.tuned("w8a8", "int8", m, x.dtype, dev, (n, k))
    if config is not None and config.fma:
        raise ValueError(f"W8A8 config {tuple(config)}: the int8 x int8 kernel is tensor-core only (fma=False)")
    # int8 operands: the tile shapes do not depend on x's dtype (no fp32 shared-memory limit here).
    bm, bn, bk, warps, stages, splits = plan.matmul_tiles(m, "w8a8", torch.int8, config)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ks = plan.k_split(tiles, k, bk, dev, split_k if split_k is not None else splits)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), triton.cdiv(k, ks))
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    split = plan.SPLIT_FIXUP if ks < k else plan.SPLIT_NONE
    ws, cnt = plan.split_workspace(m, n, grid[0] * grid[1], dev) if split else (s, s)
    _ops.jit_variant(_w8a8_kernel, _ops.interpreting(dev))[grid](
        xq, sx, q, s, b, out, ws, cnt, m, n, k, ks, grid[2], HAS_BIAS=bias is not None, SPLIT=split, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **_ops.launch_options(dev))
    return out.view(*x.shape[:-1], n)
