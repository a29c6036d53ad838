"""The store after a decode kernel's K loop, shared by dequant_matmul, sparse_gemv and act_quant: split-K sums
through the self-cleaning workspace (launch_plan.split_workspace), then the output tile, as it is or as
silu(gate) * up (compiler/ops.py EPILOGUES). Kernel helpers (ops.kernel_helper): inlined by the GPU compiler
(the same sm_90 SASS as the copies they replace), run by the interpreter when called."""

from __future__ import annotations

import triton.language as tl

from effcompile.codegen import ops as _ops


@_ops.kernel_helper
def gated(y, out_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """silu(gate) * up of the fp32 tile y [BLOCK_M, BLOCK_N] whose outputs 2i / 2i + 1 are gate i / up i
    (passes/fuse_gated_activation.py): [BLOCK_M, BLOCK_N / 2] in out_ptr's dtype, rounded as the unfused graph
    rounds (the linear's output, then silu's, then the product), with the sigmoid of codegen/triton_gen.py."""
    g, u = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
    g = g.to(out_ptr.dtype.element_ty).to(tl.float32)
    a = (g * (1.0 / (1.0 + tl.exp(-g)))).to(out_ptr.dtype.element_ty).to(tl.float32)
    return (a * u.to(out_ptr.dtype.element_ty).to(tl.float32)).to(out_ptr.dtype.element_ty)


@_ops.kernel_helper
def finish(acc, out_ptr, ws_ptr, cnt_ptr, pid_m, pid_n, offs_m, offs_n, m_mask, n_mask, N, SPLITS, SPLIT: tl.constexpr,
           EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's fp32 sums acc [BLOCK_M, BLOCK_N] over its K range, for output tile (pid_m, pid_n) of a
    (programs along M, along N, splits) grid, into the [M, N] result (a grid of output tiles by splits: pid_m
    0). SPLIT (launch_plan.SPLIT_*): 0, one program per tile, stores acc; 1 adds it into an fp32 out_ptr that
    starts at zero (or at a term of its own); 2 adds it into the fp32 workspace, and the tile's last split to
    arrive stores the total and leaves zeros (and a zero count) for the next launch. EPILOGUE 1 stores
    ``gated`` sums: output i of an [M, N / 2] result."""
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    omask = m_mask[:, None] & n_mask[None, :]
    if EPILOGUE == 1:
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_h = out_ptr + offs_m.to(tl.int64)[:, None] * (N // 2) + offs_h[None, :]
        hmask = m_mask[:, None] & (offs_h < N // 2)[None, :]
    if SPLIT == 2:
        # All threads' adds before the count (the barrier), the count an acq_rel atomic: the split that counts
        # last reads every sum, through an atomic (L2, never a stale L1 line), then leaves zeros for the next
        # launch. The sums' atomics are relaxed: the barrier and the count's release / acquire (a barrier
        # follows it before the reads) order them, and an acq_rel atomic per thread cost a MEMBAR.GPU each, two
        # of the epilogue's three on sm_90 (every CTA waits out each one).
        ws = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(cnt_ptr + tile, 1) == SPLITS - 1:
            zero = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            total = tl.atomic_add(ws, zero, mask=omask, sem="relaxed")
            if EPILOGUE == 1:
                tl.store(out_h, gated(total, out_ptr, BLOCK_M, BLOCK_N), mask=hmask)
            else:
                tl.store(out, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(ws, zero, mask=omask)
            tl.store(cnt_ptr + tile, 0)
    elif SPLIT == 1:
        tl.atomic_add(out, acc, mask=omask)
    elif EPILOGUE == 1:
        tl.store(out_h, gated(acc, out_ptr, BLOCK_M, BLOCK_N), mask=hmask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
