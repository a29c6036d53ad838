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


@triton.jit
def _cache_write_kernel(kc_ptr, vc_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, cnt_ptr, R, H, N, D, L,
                        kc0, kc1, kc2, kc3, vc0, vc1, vc2, vc3, k0, k1, k2, k3, v0, v1, v2, v3, pos_stride,
                        HAS_POS: tl.constexpr, ONE_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    i = (rows % N).to(tl.int64)  # the new token
    bh = rows // N
    h = (bh % H).to(tl.int64)
    b = (bh // H).to(tl.int64)
    if HAS_POS:
        pos = tl.load(pos_ptr + i * pos_stride, mask=r_mask, other=-1).to(tl.int64)
    else:
        pos = tl.load(len_ptr + i * 0, mask=r_mask, other=-1).to(tl.int64) + i
    ok = r_mask & (pos >= 0) & (pos < L)
    src_k = k_ptr + b * k0 + h * k1 + i * k2
    src_v = v_ptr + b * v0 + h * v1 + i * v2
    dst_k = kc_ptr + b * kc0 + h * kc1 + pos * kc2
    dst_v = vc_ptr + b * vc0 + h * vc1 + pos * vc2
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (d < D)[None, :]
        kv = tl.load(src_k[:, None] + d[None, :] * k3, mask=mask)
        tl.store(dst_k[:, None] + d[None, :] * kc3, kv, mask=mask)
        vv = tl.load(src_v[:, None] + d[None, :] * v3, mask=mask)
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


def launch(keys, values, k, v, position, length) -> None:
    b, h, n, d = k.shape
    rows = b * h * n
    if rows == 0:
        return
    block_d = min(triton.next_power_of_2(d), ELEMENTS_PER_PROGRAM)
    block_r = max(1, min(triton.next_power_of_2(rows), ELEMENTS_PER_PROGRAM // block_d))
    cnt = plan.arrival_count(k.device)
    pos = position if position is not None else length
    grid = triton.cdiv(rows, block_r)
    _ops.jit_variant(_cache_write_kernel, _ops.interpreting(k.device))[(grid,)](
        keys, values, k, v, pos, length if length is not None else pos, cnt, rows, h, n, d, keys.shape[2],
        *keys.stride(), *values.stride(), *k.stride(), *v.stride(), position.stride(0) if position is not None else 0,
        HAS_POS=position is not None, ONE_PROGRAM=grid == 1, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


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
