"""K/V cache update in one kernel (effcompile::kv_cache_write lowered): both copies, positions, counter advance.

Each program copies BLOCK_R rows (one (batch, head, new token) each, D values) of k and of v into the
caches at their positions: given (``position``), or ``length`` + the token's index, after which the
counter advances by n. Every program reads the counter before it is advanced: each counts itself in with
an acq_rel atomic after its read, and the last to arrive adds n and resets the count (the split-K
epilogue's arrival pattern, launch_plan.split_workspace), so the update stays one launch under CUDA-graph
replay; a launch of one program (batch 1 at decode) advances the counter itself after a barrier. A position outside the cache is not written (the eager op raises IndexError; a GPU kernel cannot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import cache_ops

NAME = "cache_write"  # the custom op (effcompile::cache_write) and its PATH_COUNTS key
ELEMENTS_PER_PROGRAM = 2048  # BLOCK_R x BLOCK_D of each of k and v: a decode step's update is 1-8 programs
# With RoPE the rows are q's heads too (40 for Llama-3's 32 + 8 at batch 1, 2560 elements of a 64-wide head):
# where up to 4x the elements in as many more warps (16 per thread either way) make a step's update one
# program, it takes them: that program advances the counter itself, with no arrival atomic after the copy.
ROPE_WARPS = 16
# No FMA contraction: with it (triton's default) LLVM narrows each rounded product to a 16-bit multiply and ptxas
# fuses it with the sum into fma.rn.bf16 / fma.rn.f16, one rounding where eager rounds twice (the H200 GPU lane,
# session 27: rotary q / k off by an ulp in fp16 and bf16; sm_90 PTX under triton 3.6 and 3.9). The copy-only
# variant has no arithmetic to fuse.
EXACT_ROUNDING = {"enable_fp_fusion": False}


@triton.jit
def _cache_write_kernel(kc_ptr, vc_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, cnt_ptr, q_ptr, cos_ptr, sin_ptr,
                        R, HQ, H, N, D, L, kc0, kc1, kc2, kc3, vc0, vc1, vc2, vc3, k0, k1, k2, k3, v0, v1, v2, v3,
                        q0, q1, q2, c0, c2, c3, s0, s2, s3, pos_stride, HAS_POS: tl.constexpr, ONE_PROGRAM: tl.constexpr,
                        ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr):
    _ops.wait_for_producers(PDL)  # first: with PDL, nothing may read another kernel's output before it
    # A row is one (batch, head, new token) of k, of D values; with ROPE the heads are q's HQ then k's H (k_ptr
    # is the embedding's input, all of them), each rotated, q's stored to q_ptr and k's into the cache.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    i = (rows % N).to(tl.int64)  # the new token
    bh = rows // N
    hh = (bh % (HQ + H)).to(tl.int64)  # the head in k_ptr
    b = (bh // (HQ + H)).to(tl.int64)
    is_k = hh >= HQ
    h = tl.where(is_k, hh - HQ, 0)  # the K/V head
    if HAS_POS:
        pos = tl.load(pos_ptr + i * pos_stride, mask=r_mask, other=-1).to(tl.int64)
    else:
        pos = tl.load(len_ptr + i * 0, mask=r_mask, other=-1).to(tl.int64) + i
    ok = r_mask & is_k & (pos >= 0) & (pos < L)
    src_k = k_ptr + b * k0 + hh * k1 + i * k2
    src_v = v_ptr + b * v0 + h * v1 + i * v2
    dst_k = kc_ptr + b * kc0 + h * kc1 + pos * kc2
    dst_v = vc_ptr + b * vc0 + h * vc1 + pos * vc2
    # Loads are masked by the rows alone, not by their positions: they then need not wait for the position
    # load (a round trip before the copy, most of a one-program launch); only the stores check the positions.
    kv_row = r_mask & is_k
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = (d < D)[None, :]
        mask = ok[:, None] & d_mask
        load_mask = kv_row[:, None] & d_mask
        if ROPE:
            # x cos + rotate_half(x) sin, rounded where the eager ops round (each product, then the sum);
            # rotate_half(x)[d] = -x[d + D/2] below D/2, x[d - D/2] from it.
            dt = k_ptr.dtype.element_ty
            lo = (d < D // 2)[None, :]
            read = r_mask[:, None] & d_mask
            x = tl.load(src_k[:, None] + d[None, :] * k3, mask=read, other=0.0)
            other = tl.load(src_k[:, None] + tl.where(lo, d[None, :] + D // 2, d[None, :] - D // 2) * k3, mask=read,
                            other=0.0)
            c = tl.load(cos_ptr + (b * c0 + i * c2)[:, None] + d[None, :] * c3, mask=read, other=0.0)
            sn = tl.load(sin_ptr + (b * s0 + i * s2)[:, None] + d[None, :] * s3, mask=read, other=0.0)
            xc = (x.to(tl.float32) * c.to(tl.float32)).to(dt).to(tl.float32)
            other = other.to(tl.float32)  # negated in fp32: the interpreter holds bf16 as 16-bit integers
            rs = (tl.where(lo, -other, other) * sn.to(tl.float32)).to(dt).to(tl.float32)
            kv = (xc + rs).to(dt)
            tl.store(q_ptr + (b * q0 + hh * q1 + i * q2)[:, None] + d[None, :], kv, mask=read & ~is_k[:, None])
        else:
            kv = tl.load(src_k[:, None] + d[None, :] * k3, mask=load_mask)
        tl.store(dst_k[:, None] + d[None, :] * kc3, kv, mask=mask)
        vv = tl.load(src_v[:, None] + d[None, :] * v3, mask=load_mask)
        tl.store(dst_v[:, None] + d[None, :] * vc3, vv, mask=mask)
    if not HAS_POS and ONE_PROGRAM:
        # The only program (a decode step's update at batch 1): once every warp has used its positions (the
        # barrier orders their reads before the store), it advances the counter itself, with no atomic round
        # trip on the critical path.
        tl.debug_barrier()
        tl.store(len_ptr, tl.load(len_ptr) + N)
    elif not HAS_POS:
        # Counted in after this program's read of the counter (release); the last one in (acquire) saw every
        # read happen, so advancing it now cannot change any program's positions.
        if tl.atomic_add(cnt_ptr, 1) == tl.num_programs(0) - 1:
            tl.store(len_ptr, tl.load(len_ptr) + N)
            tl.store(cnt_ptr, 0)


def supported(keys, values, k, v, position, length) -> str | None:
    """None when the kernel takes this call, else why the torch ops run instead."""
    if not all(t.dim() == 4 for t in (keys, values, k, v)):
        return "not 4-D [batch, heads, tokens, head_dim] tensors"
    if not (keys.dtype == k.dtype and values.dtype == v.dtype):
        return "cache and new states differ in dtype"
    if keys.shape[:2] != k.shape[:2] or values.shape[:2] != v.shape[:2] or k.shape[:3] != v.shape[:3]:
        return "batch, heads or token counts differ"
    if keys.shape[3] != k.shape[3] or values.shape[3] != v.shape[3] or k.shape[3] != v.shape[3]:
        return "head dims differ"
    if len({t.device for t in (keys, values, k, v, position if position is not None else length)}) != 1:
        return "tensors on more than one device"
    if position is not None and (position.dim() != 1 or position.shape[0] != k.shape[2]):
        return "position is not one index per new token"
    return None


def launch(keys, values, k, v, position, length, rope: tuple | None = None) -> torch.Tensor | None:
    """One launch: k and v into the caches. With rope = (cos, sin, heads_q), k holds q's heads then k's, before
    their rotary embedding: all are rotated, k's go into the cache and q's come back [B, heads_q, n, D]."""
    heads_q = rope[2] if rope is not None else 0
    b, hk, n, d = k.shape
    h = hk - heads_q
    q = torch.empty((b, heads_q, n, d), dtype=k.dtype, device=k.device) if rope is not None else None
    rows = b * hk * n
    if rows == 0:
        return q
    warps, tile = 4, triton.next_power_of_2(rows) * triton.next_power_of_2(d)
    if rope is not None and tile <= ELEMENTS_PER_PROGRAM * ROPE_WARPS // 4:
        # 4 warps per 2048 elements, where that makes the launch one program (else the 4-warp programs: more
        # of them share a larger update)
        warps = max(4, tile // (ELEMENTS_PER_PROGRAM // 4))
    elements = ELEMENTS_PER_PROGRAM * warps // 4
    block_d = min(triton.next_power_of_2(d), elements)
    block_r = max(1, min(triton.next_power_of_2(rows), elements // block_d))
    cnt = plan.arrival_count(k.device)
    pos = position if position is not None else length
    grid = triton.cdiv(rows, block_r)
    if rope is not None:
        cos, sin = (t.expand(b, 1, n, d) for t in rope[:2])
        trig = (q, cos, sin, *q.stride()[:3], cos.stride(0), *cos.stride()[2:], sin.stride(0), *sin.stride()[2:])
    else:
        trig = (k, k, k, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # unused placeholders
    _ops.jit_variant(_cache_write_kernel, _ops.interpreting(k.device))[(grid,)](
        keys, values, k, v, pos, length if length is not None else pos, cnt, *trig[:3], rows, heads_q, h, n, d,
        keys.shape[2], *keys.stride(), *values.stride(), *k.stride(), *v.stride(), *trig[3:],
        position.stride(0) if position is not None else 0,
        HAS_POS=position is not None, ONE_PROGRAM=grid == 1, ROPE=rope is not None, BLOCK_R=block_r,
        BLOCK_D=block_d, num_warps=warps, **(_ops.launch_options(k.device) | EXACT_ROUNDING))
    return q


def run(keys, values, k, v, position, length, mode: int = 0) -> None:
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton), 1: Triton, 2: the IR op's torch ops."""
    if (position is None) == (length is None):
        raise ValueError("cache_write takes exactly one of position (explicit) or length (a counter)")
    if _ops.use_triton(mode, k.device) and supported(keys, values, k, v, position, length) is None:
        launch(keys, values, k, v, position, length)
        path = "triton"
    else:
        cache_ops.kv_cache_write_eager(keys, values, k, v, position, length)
        path = "torch"
    _ops.count(NAME, path)


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=("keys", "values", "length"))
    def op(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor | None,
           length: torch.Tensor | None, mode: int) -> None:
        run(keys, values, k, v, position, length, mode)

    @op.register_fake
    def _fake(keys, values, k, v, position, length, mode):
        return None


ROPE_NAME = "rope_cache_write"  # effcompile::rope_cache_write, the lowered effcompile::rope_kv_cache_write


def rope_supported(keys, values, x, cos, sin, v, position, length, heads_q: int) -> str | None:
    """None when the kernel takes this rotary call, else why the torch ops run instead."""
    if not (x.dim() == 4 and 0 <= heads_q < x.shape[1]):
        return "x is not [batch, q heads + k heads, tokens, head_dim] with heads_q of its heads"
    why = supported(keys, values, x[:, heads_q:], v, position, length)
    if why is not None:
        return why
    if x.shape[3] % 2:
        return "odd head_dim"
    if not (cos.dtype == sin.dtype == x.dtype and cos.device == sin.device == x.device):
        return "cos/sin differ from x in dtype or device"
    try:
        for t in (cos, sin):
            t.expand(x.shape[0], 1, *x.shape[2:])
    except RuntimeError:
        return f"cos/sin of shape {tuple(cos.shape)} do not broadcast to [batch, 1, tokens, head_dim]"
    return None


def rope_run(keys, values, x, cos, sin, v, position, length, heads_q: int, mode: int = 0) -> torch.Tensor:
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton), 1: Triton, 2: the IR op's torch ops."""
    if (position is None) == (length is None):
        raise ValueError("rope_cache_write takes exactly one of position (explicit) or length (a counter)")
    if _ops.use_triton(mode, x.device) and rope_supported(keys, values, x, cos, sin, v, position, length,
                                                          heads_q) is None:
        q = launch(keys, values, x, v, position, length, (cos, sin, heads_q))
        path = "triton"
    else:
        q = cache_ops.rope_kv_cache_write_eager(keys, values, x, cos, sin, v, position, length, heads_q)
        path = "torch"
    _ops.count(ROPE_NAME, path)
    return q


if not _ops.op_exists(ROPE_NAME):

    @torch.library.custom_op("effcompile::" + ROPE_NAME, mutates_args=("keys", "values", "length"))
    def rope_op(keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                v: torch.Tensor, position: torch.Tensor | None, length: torch.Tensor | None, heads_q: int,
                mode: int) -> torch.Tensor:
        return rope_run(keys, values, x, cos, sin, v, position, length, heads_q, mode)

    @rope_op.register_fake
    def _rope_fake(keys, values, x, cos, sin, v, position, length, heads_q, mode):
        return x.new_empty((x.shape[0], heads_q, *x.shape[2:]))
