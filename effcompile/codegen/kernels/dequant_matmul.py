"""Fused dequantize + matmul Triton kernels (int8 per-channel, int4 group-wise): GEMV for decode, GEMM for prefill."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.compiler import ops as qops

NAME = "dequant_linear"  # the custom op (effcompile::dequant_linear) and its PATH_COUNTS key
GEMV_MAX_M = 8  # rows of activations up to which the GEMV (decode) kernel runs
_FMT = {"int8": 0, "int4": 1}
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Interpreter note (codegen/README.md): only tl builtins and tl.reduce with triton's own combine
# functions; no tl.sum or @jit helpers, which the interpreter cannot run when TRITON_INTERPRET was set
# after `import triton`. Hence the repeated inline dequantization below instead of a shared helper.


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K,
                 FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per BLOCK_N output features for all M (<= 8) rows: each weight byte is read once.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    row = offs_m.to(tl.int64)[:, None] * K
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a @jit helper
    if FMT == 0:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(q_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0).to(tl.float32)
            x = tl.load(x_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.reduce(x.to(tl.float32)[:, None, :] * w[None, :, :], 2, tl.standard._sum_combine)
        # Per-channel scale: applied once to the accumulated dot product, not per weight.
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    else:
        # int4: a byte holds k = 2j (low nibble) and 2j + 1 (high): two half-width dots, no interleave.
        KH = K // 2
        for j0 in range(0, KH, BLOCK_K // 2):
            offs_j = j0 + tl.arange(0, BLOCK_K // 2)
            j_mask = offs_j < KH
            wmask = n_mask[:, None] & j_mask[None, :]
            byte = tl.load(q_ptr + offs_n.to(tl.int64)[:, None] * KH + offs_j[None, :], mask=wmask, other=0)
            byte = byte.to(tl.int32)
            gi = offs_n.to(tl.int64)[:, None] * (K // G) + (offs_j[None, :] * 2) // G
            s = tl.load(s_ptr + gi, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gi, mask=wmask, other=0.0).to(tl.float32)
            # Round the dequantized weight to the activation dtype, as the reference does.
            lo = ((byte & 15).to(tl.float32) * s + z).to(x_ptr.dtype.element_ty).to(tl.float32)
            hi = ((byte >> 4).to(tl.float32) * s + z).to(x_ptr.dtype.element_ty).to(tl.float32)
            xmask = m_mask[:, None] & j_mask[None, :]
            xe = tl.load(x_ptr + row + 2 * offs_j[None, :], mask=xmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + row + 2 * offs_j[None, :] + 1, mask=xmask, other=0.0).to(tl.float32)
            prod = xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :]
            acc += tl.reduce(prod, 2, tl.standard._sum_combine)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K,
                 FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Tiled tl.dot: the weight tile is dequantized in registers right before the dot (never in memory).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row = offs_m.to(tl.int64)[:, None] * K
    col = offs_n.to(tl.int64)[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a @jit helper
    if FMT == 0:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(q_ptr + col * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
            # int8 codes are exact in fp16/bf16/fp32, so the dot runs in the activation dtype.
            acc += tl.dot(x.to(DOT_DT), w.to(DOT_DT), input_precision="ieee")
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    else:
        KH = K // 2
        for j0 in range(0, KH, BLOCK_K // 2):
            offs_j = j0 + tl.arange(0, BLOCK_K // 2)
            j_mask = offs_j < KH
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
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def reference(x, qweight, scales, zeros, bias, fmt: str, group_size: int) -> torch.Tensor:
    """Eager reference: dequantize to the activation dtype, then F.linear (the IR op's definition)."""
    return qops.reference(x, qweight, scales, zeros, bias, fmt, group_size)


def supported(x: torch.Tensor, qweight: torch.Tensor, fmt: str, group_size: int) -> str | None:
    """None when the kernels take these inputs, else why not (the caller runs the eager path)."""
    if fmt not in _FMT:
        return f"no Triton kernel for weight format {fmt!r}"
    if x.dtype not in qops.FLOAT_DTYPES:
        return f"activation dtype {x.dtype} is not fp32/fp16/bf16"
    k = x.shape[-1]
    if fmt == "int4" and (k % group_size or k % 2 or group_size % 2):
        return f"K={k} does not split into groups of {group_size}"
    return None


def kind_for(rows: int | None) -> str:
    """The kernel a call with ``rows`` activation rows runs (None = not known until run time)."""
    return "dequant-gemv" if rows is not None and rows <= GEMV_MAX_M else "dequant-gemm"


def launch(x, qweight, scales, zeros, bias, fmt: str, group_size: int) -> torch.Tensor:
    """Run the GEMV (M <= 8) or GEMM kernel; x is [..., K], the result [..., N] in x's dtype."""
    k, n = x.shape[-1], qweight.shape[0]
    dev = x.device
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    if m and n:
        q, s = qweight.to(dev).contiguous(), scales.to(dev).contiguous()
        z = zeros.to(dev).contiguous() if zeros is not None else s  # placeholder: FMT=int8 never reads it
        b = bias.to(dev).contiguous() if bias is not None else s
        interp = _ops.interpreting(dev)
        meta = dict(FMT=_FMT[fmt], G=max(group_size, 1), HAS_BIAS=bias is not None)
        if m <= GEMV_MAX_M:
            bm = triton.next_power_of_2(m)
            # Keep BLOCK_M * BLOCK_N * BLOCK_K (the broadcast product) at 8K elements per program.
            bk = 64 if fmt == "int4" else 128
            bn = max(8192 // (bm * bk), 8)
            grid = (triton.cdiv(n, bn),)
            _ops.jit_variant(_gemv_kernel, interp)[grid](x2, q, s, z, b, out, m, n, k, **meta,
                                                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        else:
            bm, bn, bk = 32, 64, 64
            grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
            # The interpreter's tl.dot gets bf16 wrong (numpy has no bf16): upcast there; bf16 values
            # are exact in fp32, so only the accumulation order differs.
            dot = tl.float32 if interp and x.dtype == torch.bfloat16 else _TL[x.dtype]
            _ops.jit_variant(_gemm_kernel, interp)[grid](x2, q, s, z, b, out, m, n, k, **meta, DOT_DT=dot,
                                                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out.view(*x.shape[:-1], n)


def run(x, qweight, scales, zeros, bias, fmt: str, group_size: int, mode: int = 0) -> torch.Tensor:
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton), 1: Triton, 2: the IR op's eager/CPU path."""
    if _ops.use_triton(mode, x.device) and supported(x, qweight, fmt, group_size) is None:
        out, path = launch(x, qweight, scales, zeros, bias, fmt, group_size), "triton"
    else:
        out, path = qops.wq_linear_eager(x, qweight, scales, zeros, bias, fmt, group_size), "torch"
    _ops.count(NAME, path)
    return out


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, group_size: int, mode: int) -> torch.Tensor:
        return run(x, qweight, scales, zeros, bias, fmt, group_size, mode)

    @op.register_fake
    def _fake(x, qweight, scales, zeros, bias, fmt, group_size, mode):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))
