"""Fused dequantize + matmul Triton kernel (int8 per-channel, int4 group-wise): split-K for decode, tiles for prefill."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import ops as qops

NAME = "dequant_linear"  # the custom op (effcompile::dequant_linear) and its PATH_COUNTS key
GEMV_MAX_M = 8  # rows of activations up to which the GEMV (decode) kernel runs
_FMT = {"int8": 0, "int4": 1}

# Interpreter note (codegen/README.md): only tl builtins and tl.reduce with triton's own combine
# functions; no tl.sum or @jit helpers, which the interpreter cannot run when TRITON_INTERPRET was set
# after `import triton`. Hence the repeated inline dequantization below instead of a shared helper.


@triton.jit
def _matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, K_SPLIT,
                   FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DT: tl.constexpr,
                   ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Tiled tl.dot: the weight tile is dequantized in registers right before the dot (never in memory).
    # Decode (few rows) pads M to 16 for the tensor cores and splits K over programs (ATOMIC: fp32
    # partial sums added into a zeroed output), so a handful of output tiles still fills every SM.
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
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a @jit helper
    if FMT == 0:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            x = tl.load(x_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(q_ptr + col * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
            # int8 codes are exact in fp16/bf16/fp32, so the dot runs in the activation dtype.
            acc += tl.dot(x.to(DOT_DT), w.to(DOT_DT), input_precision="ieee")
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    else:
        KH = K // 2
        for j0 in range(k_lo // 2, k_hi // 2, BLOCK_K // 2):
            offs_j = j0 + tl.arange(0, BLOCK_K // 2)
            j_mask = offs_j < k_hi // 2
            wmask = j_mask[:, None] & n_mask[None, :]
            byte = tl.load(q_ptr + col * KH + offs_j[:, None], mask=wmask, other=0).to(tl.int32)
            gi = col * (K // G) + (offs_j[:, None] * 2) // G
            s = tl.load(s_ptr + gi, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gi, mask=wmask, other=0.0).to(tl.float32)
            lo = ((byte & 15).to(tl.float32) * s + z).to(x_ptr.dtype.element_ty)
            hi = ((byte >> 4).to(tl.float32) * s + z).to(x_ptr.dtype.element_ty)
            xmask = m_mask[:, None] & j_mask[None, :]
            xe = tl.load(x_ptr + row + 2 * offs_j[None, :], mask=xmask, other=0.0)
            xo = tl.load(x_ptr + row + 2 * offs_j[None, :] + 1, mask=xmask, other=0.0)
            acc += tl.dot(xe.to(DOT_DT), lo.to(DOT_DT), input_precision="ieee")
            acc += tl.dot(xo.to(DOT_DT), hi.to(DOT_DT), input_precision="ieee")
    if HAS_BIAS:
        first = (offs_n * 0 + k_lo) == 0  # a tensor: the interpreter refuses a scalar bool in a mask
        b = tl.load(b_ptr + offs_n, mask=n_mask & first, other=0.0).to(tl.float32)  # added by split 0 only
        acc += b[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def reference(x, qweight, scales, zeros, bias, fmt: str, group_size: int) -> torch.Tensor:
    """Eager reference: dequantize to the activation dtype, then F.linear (the IR op's definition)."""
    return qops.reference(x, qweight, scales, zeros, bias, fmt, group_size)


def supported(x: torch.Tensor, qweight: torch.Tensor, fmt: str, group_size: int, act: str = "none") -> str | None:
    """None when the kernels take these inputs, else why not (the caller runs the eager path)."""
    if fmt not in _FMT:
        return f"no Triton kernel for weight format {fmt!r} yet (eager dequantize + matmul)"
    if act != "none":
        return f"no Triton kernel for activations={act!r} yet (eager path)"
    if x.dtype not in qops.FLOAT_DTYPES:
        return f"activation dtype {x.dtype} is not fp32/fp16/bf16"
    k = x.shape[-1]
    if fmt == "int4" and (k % group_size or k % 2 or group_size % 2):
        return f"K={k} does not split into groups of {group_size}"
    return None


def kind_for(rows: int | None, fmt: str = "int8", act: str = "none") -> str:
    """The kernel a call with ``rows`` activation rows runs (None = not known until run time)."""
    if fmt not in _FMT or act != "none":
        return "eager (no Triton kernel for this format)"
    return "dequant-gemv" if rows is not None and rows <= GEMV_MAX_M else "dequant-gemm"


def launch(x, qweight, scales, zeros, bias, fmt: str, group_size: int, split_k: int | None = None,
           config: plan.Config | None = None) -> torch.Tensor:
    """Run the kernel on x [..., K]; the result is [..., N] in x's dtype. split_k forces the K split (tests);
    config overrides the tile shape (benchmarks/kernels.py --sweep)."""
    k, n = x.shape[-1], qweight.shape[0]
    dev = x.device
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if not (m and n):
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=dev)
    q, s = qweight.to(dev).contiguous(), scales.to(dev).contiguous()
    z = zeros.to(dev).contiguous() if zeros is not None else s  # placeholder: FMT=int8 never reads it
    b = bias.to(dev).contiguous() if bias is not None else s
    interp = _ops.interpreting(dev)
    if config is None and m <= GEMV_MAX_M:
        config = plan.tuned("dequant", fmt, m, x.dtype, dev)
    if config is not None:
        bm, bn, bk, warps, stages = max(16, triton.next_power_of_2(min(m, 64))), *config[:4]
        split_k = split_k if split_k is not None else config.splits
    elif m <= GEMV_MAX_M:  # decode: M padded to one 16-row dot tile, long K chunks, split over programs
        bm, bn, bk, warps, stages = 16, *plan.decode_config(fmt, x.dtype)
    else:
        bm, bn, bk, warps, stages = (64 if m >= 64 else 32), 64, 64, 4, 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ks = plan.k_split(tiles, k, bk, dev, split_k if split_k is not None else (None if m <= GEMV_MAX_M else 1))
    atomic = ks < k
    out = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.float32 if atomic else x.dtype, device=dev)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), triton.cdiv(k, ks))
    _ops.jit_variant(_matmul_kernel, interp)[grid](
        x2, q, s, z, b, out, m, n, k, ks, FMT=_FMT[fmt], G=max(group_size, 1), HAS_BIAS=bias is not None,
        DOT_DT=plan.dot_dtype(x.dtype, interp), ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    return out.to(x.dtype).view(*x.shape[:-1], n)


def run(x, qweight, scales, zeros, bias, fmt: str, group_size: int, act: str = "none", mode: int = 0) -> torch.Tensor:
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton), 1: Triton, 2: the IR op's eager/CPU path."""
    if _ops.use_triton(mode, x.device) and supported(x, qweight, fmt, group_size, act) is None:
        out, path = launch(x, qweight, scales, zeros, bias, fmt, group_size), "triton"
    else:
        out, path = qops.wq_linear_eager(x, qweight, scales, zeros, bias, fmt, group_size, act), "torch"
    _ops.count(NAME, path)
    return out


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, group_size: int, act: str, mode: int) -> torch.Tensor:
        return run(x, qweight, scales, zeros, bias, fmt, group_size, act, mode)

    @op.register_fake
    def _fake(x, qweight, scales, zeros, bias, fmt, group_size, act, mode):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))
