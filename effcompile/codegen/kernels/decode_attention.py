"""Decode attention (one query token per sequence) over a KV cache, grouped-query, in Triton (split-L, flash-decoding).

SDPA at decode reads the whole static cache every step: its additive mask hides the positions past the current
one, but the kernel still loads their K and V (a 4096-token cache on Llama-3.2-1B: 128 MB a step, whatever the
position). Here each program takes one K/V head of one sequence and a range of cache positions (a split), with
all the query heads that share that K/V head as the rows of its dots. A block of positions the mask leaves all
-inf is skipped: neither K nor V is read. Splits write their running max, sum and weighted values; a second
kernel combines them (one split: the first kernel writes the output itself). As our other kernels it is a PDL
launch on Hopper (ops.launch_options), where cuDNN's SDPA is not.

Opt-in (GroupedQueryAttention(decode_kernel=True)): untimed on a GPU when written (session 15); the reference is
compiler/attention_ops.gqa_attention_eager, which every other call still runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import attention_ops

NAME = "decode_attention"  # the custom op (effcompile::decode_attention) and its PATH_COUNTS key
BLOCK_L = 64  # cache positions per block: the unit a mask can skip
MAX_GROUP = 64  # query heads per K/V head


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, ml_ptr, L, HKV, G, L_SPLIT, SPLITS, scale,
                      q0, q1, k0, k1, k2, v0, v1, v2, mb, ml, o0, o1, HAS_MASK: tl.constexpr, DIRECT: tl.constexpr,
                      DOT_DT: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                      PDL: tl.constexpr):
    _ops.wait_for_producers(PDL)  # first: with PDL, nothing may read another kernel's output before it
    bh = tl.program_id(0)  # sequence b, K/V head h
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    heads = h * G + offs_g  # the query heads of this K/V head (repeat_kv's order)
    q = tl.load(q_ptr + b * q0 + heads[:, None] * q1 + offs_d[None, :], mask=g_mask[:, None], other=0.0).to(DOT_DT)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.full((GP,), 0.0, tl.float32)
    acc = tl.full((GP, D), 0.0, tl.float32)
    lo = split * L_SPLIT
    hi = tl.minimum(lo + L_SPLIT, L)
    for l0 in range(lo, hi, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < hi
        if HAS_MASK:
            bias = tl.load(mask_ptr + b * mb + offs_l * ml, mask=l_mask, other=float("-inf")).to(tl.float32)
        else:
            bias = tl.where(l_mask, 0.0, float("-inf"))
        # A block of positions the mask leaves all -inf (past the current one, in a static cache) is not read.
        if tl.reduce(bias, 0, tl.standard._elementwise_max) > float("-inf"):
            kt = tl.load(k_ptr + b * k0 + h * k1 + offs_l[:, None].to(tl.int64) * k2 + offs_d[None, :],
                         mask=l_mask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kt.to(DOT_DT)), input_precision="ieee") * scale + bias[None, :]  # [GP, BLOCK_L]
            m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            vt = tl.load(v_ptr + b * v0 + h * v1 + offs_l[:, None].to(tl.int64) * v2 + offs_d[None, :],
                         mask=l_mask[:, None], other=0.0)
            # p in the values' dtype for the dot, as flash attention rounds it
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), vt.to(DOT_DT), input_precision="ieee")
            m_i = m_new
    if DIRECT:  # one split: this program's sums are the whole softmax
        out = out_ptr + b * o0 + heads[:, None] * o1 + offs_d[None, :]
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (bh * SPLITS + split).to(tl.int64) * GP + offs_g  # this split's rows of the workspace
        tl.store(ml_ptr + row * 2, m_i)
        tl.store(ml_ptr + row * 2 + 1, l_i)
        tl.store(ws_ptr + row[:, None] * D + offs_d[None, :], acc)


@triton.jit
def _combine_kernel(out_ptr, ws_ptr, ml_ptr, HKV, G, SPLITS, o0, o1, SP: tl.constexpr, GP: tl.constexpr,
                    D: tl.constexpr, PDL: tl.constexpr):
    # The splits of one (sequence, K/V head): softmax over all positions = sum_s e^(m_s - M) acc_s / sum_s
    # e^(m_s - M) l_s, M the largest running max (a split the mask skipped entirely has m_s = -inf: weight 0).
    # The maxima are one [SP, GP] load; the values, a [GP, D] tile each, are summed one split at a time (all
    # of them at once were 512 registers a thread for 32 splits of 16 x 128).
    _ops.wait_for_producers(PDL)
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    offs_s = tl.arange(0, SP)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    first = (bh * SPLITS).to(tl.int64) * GP  # this (sequence, head)'s first workspace row
    rows = first + offs_s.to(tl.int64)[:, None] * GP + offs_g[None, :]  # [SP, GP]
    m = tl.load(ml_ptr + rows * 2, mask=(offs_s < SPLITS)[:, None], other=float("-inf"))
    top = tl.reduce(m, 0, tl.standard._elementwise_max)  # [GP]
    num = tl.full((GP, D), 0.0, tl.float32)
    den = tl.full((GP,), 0.0, tl.float32)
    for split in range(0, SPLITS):
        row = first + split * GP + offs_g  # [GP]
        m_s = tl.load(ml_ptr + row * 2)
        w = tl.where(m_s > float("-inf"), tl.exp(m_s - top), 0.0)
        den += tl.load(ml_ptr + row * 2 + 1) * w
        num += tl.load(ws_ptr + row[:, None] * D + offs_d[None, :]) * w[:, None]
    heads = h * G + offs_g
    out = out_ptr + b * o0 + heads[:, None] * o1 + offs_d[None, :]
    tl.store(out, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=(offs_g < G)[:, None])


def supported(q, k, v, attn_mask, dropout_p: float, is_causal: bool) -> str | None:
    """None when the kernels take this call, else why the SDPA path runs instead."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1:
        return "not one query token per sequence ([B, H, 1, D] queries)"
    if dropout_p or is_causal:
        return "dropout or is_causal"
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1] or hq // k.shape[1] > MAX_GROUP:
        return "K / V shapes do not match the queries (or more than 64 query heads per K/V head)"
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in [16, 256]"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "dtypes differ or are not fp32/fp16/bf16"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head dim not contiguous"
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool or not attn_mask.is_floating_point():
            return "boolean mask (an additive one is taken)"
        if attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1) or attn_mask.shape[0] not in (1, b) \
                or attn_mask.shape[3] != k.shape[2]:
            return "mask is not [B or 1, 1, 1, L]"
    if len({t.device for t in (q, k, v) + ((attn_mask,) if attn_mask is not None else ())}) != 1:
        return "tensors on more than one device"
    return None


def launch(q, k, v, attn_mask, scale: float | None, splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for [B, Hq, 1, D] queries over [B, Hkv, L, D] caches (supported())."""
    b, hq, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.empty((b, hq, 1, d), dtype=q.dtype, device=q.device)
    if b == 0 or hq == 0:
        return out
    dev = q.device
    blocks = triton.cdiv(max(length, 1), BLOCK_L)
    if splits is None:  # about two programs per SM, on a GPU
        splits = triton.cdiv(2 * torch.cuda.get_device_properties(dev).multi_processor_count, b * hkv) \
            if dev.type == "cuda" else 1
    l_split = triton.cdiv(blocks, max(1, min(splits, blocks))) * BLOCK_L
    splits = triton.cdiv(max(length, 1), l_split)
    gp = max(16, triton.next_power_of_2(g))  # dot rows (the query heads), at least 16 for the tensor cores
    direct = splits == 1
    ws = torch.empty((b * hkv * splits * gp, d), dtype=torch.float32, device=dev) if not direct else out
    mls = torch.empty((b * hkv * splits * gp, 2), dtype=torch.float32, device=dev) if not direct else out
    mask = attn_mask if attn_mask is not None else q
    mb = attn_mask.stride(0) if attn_mask is not None and attn_mask.shape[0] > 1 else 0
    ml = attn_mask.stride(3) if attn_mask is not None else 0
    interp = _ops.interpreting(dev)
    pdl = _ops.launch_options(dev)
    _ops.jit_variant(_attention_kernel, interp)[(b * hkv, splits)](
        q, k, v, mask, out, ws, mls, length, hkv, g, l_split, splits, scale if scale is not None else d ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mb, ml, out.stride(0), out.stride(1), HAS_MASK=attn_mask is not None, DIRECT=direct,
        DOT_DT=plan.dot_dtype(q.dtype, interp), GP=gp, D=d,
        BLOCK_L=BLOCK_L, num_warps=4, **pdl)
    if not direct:
        _ops.jit_variant(_combine_kernel, interp)[(b * hkv,)](
            out, ws, mls, hkv, g, splits, out.stride(0), out.stride(1), SP=triton.next_power_of_2(splits), GP=gp,
            D=d, num_warps=4, **pdl)
    return out


def run(q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale: float | None, mode: int = 0) -> torch.Tensor:
    """The Triton kernels when they take the call (mode 0: on CUDA or under TRITON_INTERPRET), else SDPA."""
    why = supported(q, k, v, attn_mask, dropout_p, is_causal)
    if why is None and _ops.use_triton(mode, q.device):
        out, path = launch(q, k, v, attn_mask, scale), "triton"
    else:
        out, path = attention_ops.gqa_attention_eager(q, k, v, attn_mask, dropout_p, is_causal, scale), "torch"
    _ops.count(NAME, path)
    return out


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
           is_causal: bool, scale: float | None, mode: int) -> torch.Tensor:
        return run(q, k, v, attn_mask, dropout_p, is_causal, scale, mode)

    @op.register_fake
    def _fake(q, k, v, attn_mask, dropout_p, is_causal, scale, mode):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
