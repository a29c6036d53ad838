"""Sparse-activation GEMV (decode, 1-8 rows): threshold the input and read only the weight rows still needed;
past 8 rows, for int4 / int8 weights, the same kernel as a GEMM over M tiles (prefill).

Weights are input-major (compiler/sparse_linear.py): row k of W^T holds every output's weight for input
channel k, contiguous, so when no activation row needs channel k the masked load of that row issues no
memory traffic. float, int8 (per-output scale) and int4 (groups along K, two outputs per byte) share the
kernel: the int4 variant is sparse activations x int4 weights in one pass over the packed bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import epilogue as _epilogue
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.codegen.kernels import sparse_rows
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler import sparse_ops

NAME = "sparse_gemv"  # the custom op (effcompile::sparse_gemv) and its PATH_COUNTS key
_FMT = {"int8": 0, "int4": 1, "float": 2}
COMPACT_SEGMENT = 128  # channels compacted at a time by one-row float / int8 launches (int4: its group)
FLAT_SEGS = 8  # segments a Config.flat launch compacts per step, at most
FLAT_TAIL = 8  # chunks of -1 after a flat launch's list, the kernel's TAIL: reads past it reach at most 6 (PREFETCH 4)
# Rows up to which a masked launch skips the weight rows no activation row keeps (SKIP_ROWS); past it every row is
# read and only x thresholded. At 50 % random sparsity 3 rows need 88 % of the rows, 8 rows 99.6 %, and the keep
# reduction across rows costs more (sm_90 SASS at 8 rows, triton 3.6: loop instructions int8 1005 -> 789, int4
# 560 -> 401, float 414 -> 249 without it, no shuffles; untimed).
SKIP_ROWS_MAX = 2

# Interpreter rules as in codegen/README.md: tl builtins and tl.reduce with triton's own combine fns.


@triton.jit
def _sparse_kernel(x_ptr, t_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, scr_ptr, M, N, K, K_SPLIT,
                   SPLITS, FMT: tl.constexpr, G: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_DT: tl.constexpr, I4_BITS: tl.constexpr, I4_OFF: tl.constexpr, I4_ASM: tl.constexpr,
                   SPLIT: tl.constexpr, FMA: tl.constexpr, COMPACT: tl.constexpr, SEG: tl.constexpr, PREFETCH: tl.constexpr,
                   IDX_AHEAD: tl.constexpr, FLAT: tl.constexpr, SEGS: tl.constexpr, TAIL: tl.constexpr,
                   EPILOGUE: tl.constexpr, THRESHOLD: tl.constexpr, SKIP_ROWS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _ops.wait_for_producers(PDL)  # first: with PDL, nothing may read another kernel's output before it
    pid_n = tl.program_id(0)
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    # Decode grids have one program along axis 2; a prefill launch (launch's gemm) tiles M there.
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = offs_m.to(tl.int64)[:, None] * K
    HALF: tl.constexpr = BLOCK_N // 2
    if FMT == 1:  # int4: this program owns outputs 2j (low nibbles) and 2j + 1 (high), j in its HALF bytes
        offs_j = pid_n * HALF + tl.arange(0, HALF)
        j_mask = offs_j < N // 2
        acc_lo = tl.full((BLOCK_M, HALF), 0.0, tl.float32)
        acc_hi = tl.full((BLOCK_M, HALF), 0.0, tl.float32)
        acc1_lo = tl.full((BLOCK_K, HALF), 0.0, tl.float32)
        acc1_hi = tl.full((BLOCK_K, HALF), 0.0, tl.float32)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if COMPACT:
        # One row, and only the rows it keeps visited: the kept channels are compacted into a per-program scratch
        # list (a cumsum gives each its slot), then their weight rows are loaded BLOCK_K at a time. Skipped
        # channels cost neither bytes nor arithmetic, and every chunk loads BLOCK_K needed rows (the masked path
        # loads about half of its chunk at 50 % sparsity). Products accumulate per [chunk row, output] and are
        # summed over K once, after the loop.
        if FMT == 1:  # int4 as int32 words: 8 outputs each, output 8w + p in nibble p
            BW: tl.constexpr = BLOCK_N // 8
            offs_w = pid_n * BW + tl.arange(0, BW)
            w_mask = offs_w < N // 8
            acc0 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc1 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc2 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc3 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc4 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc5 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc6 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            acc7 = tl.full((BLOCK_K, BW), 0.0, tl.float32)
            row_len = N // 8  # a kept channel's weights: N // 8 words at offs_w, else N values at offs_n
            cols = offs_w
            cols_mask = w_mask
        else:
            acc2d = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
            row_len = N
            cols = offs_n
            cols_mask = n_mask
        # 1.0's bits for the int4 decode, held in a register: with both of a nibble's constants immediate
        # ptxas spent two LOP3s on each (as in dequant_matmul.py). K_SPLIT is under 2**30: the or adds nothing.
        one = 0x3F800000 | (K_SPLIT >> 30)
        if FLAT:
            # The whole K split compacted first, SEGS segments per step, into one list of K_SPLIT entries whose
            # int4 segments (groups) are padded to whole chunks, and one barrier; then a single loop over its
            # chunks, whose prefetch runs across segments. The per-segment path below pays a scan, a barrier and
            # a drained prefetch at every segment (sm_90 SASS, triton 3.6, (256, 16, 4, 1): 241 instructions a
            # segment against 173 per chunk of 16 rows, ~4 chunks a segment at 50 %).
            # TAIL: -1s after the list (FLAT_TAIL chunks), so entry loads need no mask
            lists = scr_ptr + (tl.program_id(1) * tl.num_programs(0) + pid_n).to(tl.int64) * (K_SPLIT + TAIL)
            length = k_lo * 0
            for s0 in range(k_lo, k_hi, SEGS * SEG):
                length = sparse_rows.compact_segments(x_ptr, t_ptr, lists, s0, k_hi, length, PER_CHANNEL, SEGS, SEG,
                                                      BLOCK_K if FMT == 1 else 1)
            tl.store(lists + length + tl.arange(0, TAIL), tl.full((TAIL,), -1, tl.int32))
            tl.debug_barrier()  # the list is complete before any warp reads it
            # The int4 scales and zeros (affine form) of group g_cur. A chunk's group is its first entry's.
            grp = sparse_rows.list_chunk(lists, 0, G, BLOCK_K)[1]
            if FMT == 1:
                s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7 = sparse_rows.affine(
                    *sparse_rows.group_scales(s_ptr, z_ptr, grp, N, offs_w, w_mask))
                g_cur = grp
            # PREFETCH chunks (0-4) ahead in registers: each iteration loads the rows of the chunk PREFETCH ahead
            # of the one it multiplies, across segment boundaries. A CTA keeps PREFETCH chunks of weights in flight
            # (2 KB each at (256, 16), ~4 registers a thread), where the per-segment path drains at every segment.
            if PREFETCH >= 1:
                x_1, w_1, grp_1 = sparse_rows.chunk_rows(lists, 0, G, BLOCK_K, x_ptr, w_ptr, row_len,
                                                         cols, cols_mask)
            if PREFETCH >= 2:
                x_2, w_2, grp_2 = sparse_rows.chunk_rows(lists, BLOCK_K, G, BLOCK_K, x_ptr, w_ptr, row_len,
                                                         cols, cols_mask)
            if PREFETCH >= 3:
                x_3, w_3, grp_3 = sparse_rows.chunk_rows(lists, 2 * BLOCK_K, G, BLOCK_K, x_ptr, w_ptr,
                                                         row_len, cols, cols_mask)
            if PREFETCH >= 4:
                x_4, w_4, grp_4 = sparse_rows.chunk_rows(lists, 3 * BLOCK_K, G, BLOCK_K, x_ptr, w_ptr,
                                                         row_len, cols, cols_mask)
            if PREFETCH >= 1:  # and the entries of the chunk after those (see below)
                idx_n, grp_n = sparse_rows.list_chunk(lists, PREFETCH * BLOCK_K, G, BLOCK_K)
            for c in range(0, length, BLOCK_K):
                if PREFETCH == 0:
                    x_l, w_l, grp_l = sparse_rows.chunk_rows(lists, c, G, BLOCK_K, x_ptr, w_ptr, row_len, cols,
                                                             cols_mask)
                else:
                    # Rows by entries loaded an iteration earlier, and the next chunk's entries: a weight load
                    # never waits on an entry load just issued (a round trip to L2 every iteration otherwise).
                    x_l, w_l = sparse_rows.list_rows(idx_n, x_ptr, w_ptr, row_len, cols, cols_mask)
                    grp_l = grp_n
                    idx_n, grp_n = sparse_rows.list_chunk(lists, c + (PREFETCH + 1) * BLOCK_K, G, BLOCK_K)
                if PREFETCH == 0:
                    x_c, w, grp_c = x_l, w_l, grp_l
                else:  # the oldest prefetched chunk is this one; the others move up, the new one last
                    x_c, w, grp_c = x_1, w_1, grp_1
                    if PREFETCH == 1:
                        x_1, w_1, grp_1 = x_l, w_l, grp_l
                    else:
                        x_1, w_1, grp_1 = x_2, w_2, grp_2
                        if PREFETCH == 2:
                            x_2, w_2, grp_2 = x_l, w_l, grp_l
                        else:
                            x_2, w_2, grp_2 = x_3, w_3, grp_3
                            if PREFETCH == 3:
                                x_3, w_3, grp_3 = x_l, w_l, grp_l
                            else:
                                x_3, w_3, grp_3 = x_4, w_4, grp_4
                                x_4, w_4, grp_4 = x_l, w_l, grp_l
                xv = x_c.to(tl.float32)[:, None]
                if FMT == 1:
                    if grp_c != g_cur:  # a new group: its scales, loaded after the next chunk's rows were asked for
                        s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7 = sparse_rows.affine(
                            *sparse_rows.group_scales(s_ptr, z_ptr, grp_c, N, offs_w, w_mask))
                        g_cur = grp_c
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = sparse_rows.int4_products(
                        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, xv, w, one,
                        s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7)
                else:
                    acc2d = sparse_rows.float_products(acc2d, xv, w, FMT)
        else:
            # Per segment of SEG channels (an int4 group): compacted, then its chunks; two lists used in turn, so a
            # segment's stores never overwrite indices another warp still reads.
            lists = scr_ptr + (tl.program_id(1) * tl.num_programs(0) + pid_n).to(tl.int64) * (2 * SEG)
            for g0 in range(k_lo, k_hi, SEG):  # the launcher splits K at segment boundaries
                offs_g = g0 + tl.arange(0, SEG)
                g_mask = offs_g < k_hi
                if FMT == 1:
                    # This group's scales and zeros: loaded first, so their trip to memory overlaps the compaction
                    # (nothing is hoisted above the barrier below).
                    s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7 = sparse_rows.group_scales(
                        s_ptr, z_ptr, g0 // G, N, offs_w, w_mask)
                keep = sparse_rows.kept(x_ptr, t_ptr, offs_g, g_mask, PER_CHANNEL)[1]
                ones = keep.to(tl.int32)
                slots = lists + ((g0 - k_lo) // SEG % 2) * SEG
                tl.store(slots + tl.associative_scan(ones, 0, tl.standard._sum_combine) - 1, offs_g, mask=keep)
                count = tl.reduce(ones, 0, tl.standard._sum_combine)
                tl.debug_barrier()  # the list is complete before any warp reads it
                if FMT == 1:
                    s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7 = sparse_rows.affine(
                        s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7)
                if PREFETCH:  # the segment's first chunk; each iteration then loads the next one (dequant_matmul.py)
                    c_mask = tl.arange(0, BLOCK_K) < count
                    idx = tl.load(slots + tl.arange(0, BLOCK_K), mask=c_mask, other=-1)
                    xv_n, w_n = sparse_rows.list_rows(idx, x_ptr, w_ptr, row_len, cols, cols_mask)
                    if IDX_AHEAD:
                        # And the second chunk's indices: each iteration then loads the next chunk's rows by indices
                        # loaded an iteration earlier, and the indices of the chunk after it, so a weight load never
                        # waits on an index load just issued (stages >= 3; sm_90: a few more registers).
                        idx_n = tl.load(slots + BLOCK_K + tl.arange(0, BLOCK_K),
                                        mask=BLOCK_K + tl.arange(0, BLOCK_K) < count, other=-1)
                for c in range(0, count, BLOCK_K):
                    # This chunk's rows, or with PREFETCH the next chunk's (this one's came last iteration). Past the
                    # count x is 0, so the padding rows (masked to 0; int4 word 0 is v = 1) add nothing.
                    if IDX_AHEAD:
                        idx = idx_n
                        idx_n = tl.load(slots + c + 2 * BLOCK_K + tl.arange(0, BLOCK_K),
                                        mask=c + 2 * BLOCK_K + tl.arange(0, BLOCK_K) < count, other=-1)
                    else:
                        idx = tl.load(slots + c + BLOCK_K * PREFETCH + tl.arange(0, BLOCK_K),
                                      mask=c + BLOCK_K * PREFETCH + tl.arange(0, BLOCK_K) < count, other=-1)
                    x_l, w_l = sparse_rows.list_rows(idx, x_ptr, w_ptr, row_len, cols, cols_mask)
                    if PREFETCH:
                        xv, w = xv_n.to(tl.float32)[:, None], w_n
                        xv_n, w_n = x_l, w_l
                    else:
                        xv, w = x_l.to(tl.float32)[:, None], w_l
                    if FMT == 1:
                        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = sparse_rows.int4_products(
                            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, xv, w, one,
                            s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7)
                    else:
                        acc2d = sparse_rows.float_products(acc2d, xv, w, FMT)
        if FMT == 1:
            # Output 2j is in nibble 2j mod 8 of word j // 4: even nibbles interleave into the low outputs, odd
            # into the high ones. Joined before the sum over K, so it is two reductions across warps (through
            # shared memory) rather than eight.
            even = tl.join(tl.join(acc0, acc4), tl.join(acc2, acc6))
            odd = tl.join(tl.join(acc1, acc5), tl.join(acc3, acc7))
            acc_lo += tl.reshape(tl.reduce(even, 0, tl.standard._sum_combine), (HALF,))[None, :]
            acc_hi += tl.reshape(tl.reduce(odd, 0, tl.standard._sum_combine), (HALF,))[None, :]
        else:
            acc += tl.reduce(acc2d, 0, tl.standard._sum_combine)[None, :]
    elif FMA and BLOCK_M == 1 and FMT != 1:
        # One row, float / int8, every chunk visited with the skipped rows masked (no traffic for them): products
        # kept per [k, output] and summed over K once, after the loop, as the compacted path does. A sum over the
        # chunk's K every iteration crossed warps through shared memory: 10 barriers a chunk for (512, 16, 4, 1),
        # session 13's sparse/float/m1 winner (sm_90 SASS, triton 3.6).
        # With PREFETCH (stages >= 2) the next chunk's x, thresholds and kept weight rows are loaded before this
        # chunk's arithmetic: a weight load waits on its chunk's keep mask (an x and a threshold load, L2 hits),
        # and without it each chunk waited on that round trip and then on HBM with nothing else in flight.
        acc2d = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        if PREFETCH:  # the first chunk's operands; each iteration then loads the next chunk's
            xk_n, keep_n, w_n = sparse_rows.kept_rows(x_ptr, t_ptr, w_ptr, k_lo + tl.arange(0, BLOCK_K), k_hi, offs_n, n_mask, N,
                                           PER_CHANNEL)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # This chunk's operands, or with PREFETCH the next chunk's (this one's came last iteration).
            xk_l, keep_l, w_l = sparse_rows.kept_rows(x_ptr, t_ptr, w_ptr, k0 + BLOCK_K * PREFETCH + tl.arange(0, BLOCK_K), k_hi,
                                           offs_n, n_mask, N, PER_CHANNEL)
            if PREFETCH:
                xk, keep, w = xk_n, keep_n, w_n
                xk_n, keep_n, w_n = xk_l, keep_l, w_l
            else:
                xk, keep, w = xk_l, keep_l, w_l
            if FMT == 0:  # int8 codes by their bits: 2**23 + 128 + c, exact (the scale comes after)
                wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            else:
                wf = w.to(tl.float32)
            acc2d += tl.where(keep, xk.to(tl.float32), 0.0)[:, None] * wf
        acc += tl.reduce(acc2d, 0, tl.standard._sum_combine)[None, :]
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            x = tl.load(x_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if THRESHOLD:
                if PER_CHANNEL:
                    t = tl.load(t_ptr + offs_k, mask=k_mask, other=0.0)
                else:
                    t = tl.load(t_ptr + offs_k * 0)  # one threshold, broadcast
                # Compared in the activation dtype, as the reference does (|x| > t.to(x.dtype)): an fp32
                # threshold between two bf16 values would flip channels that sit right at it.
                t = t.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
                keep = tl.abs(x.to(tl.float32)) > t
                x = tl.where(keep, x, 0.0).to(DOT_DT)
                if SKIP_ROWS:
                    # A weight row is needed when any activation row keeps its channel: skipped rows are never read.
                    need = tl.reduce(keep.to(tl.int32), 0, tl.standard._sum_combine) > 0
                else:
                    need = k_mask
            else:  # a prefill with decode_only thresholds: the input as it is, every row needed
                x = x.to(DOT_DT)
                need = k_mask
            if FMT == 1:
                # The launcher keeps BLOCK_K <= G, so this chunk lies inside one group: its scales and zeros are
                # one [N] load each, not a gather per weight.
                wmask = (need & k_mask)[:, None] & j_mask[None, :]
                byte = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * (N // 2) + offs_j[None, :], mask=wmask, other=0)
                # The group's scales and zeros of outputs 2j and 2j + 1: one contiguous [HALF, 2] load each, split
                # in registers (two stride-2 loads were a 2-byte load instruction per value).
                gi = ((k0 // G) * N + 2 * offs_j.to(tl.int64))[:, None] + tl.arange(0, 2)[None, :]
                s_lo, s_hi = tl.split(tl.load(s_ptr + gi, mask=j_mask[:, None], other=0.0))
                z_lo, z_hi = tl.split(tl.load(z_ptr + gi, mask=j_mask[:, None], other=0.0))
                # Codes to floats by their bits, not an integer-to-float conversion (see dequant_matmul.py).
                if FMA or DOT_DT == tl.float32:
                    # 2**23 + q, taken off per element.
                    byte = byte.to(tl.int32)
                    lo = ((byte & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    s_lo, z_lo = s_lo.to(tl.float32)[None, :], z_lo.to(tl.float32)[None, :]
                    s_hi, z_hi = s_hi.to(tl.float32)[None, :], z_hi.to(tl.float32)[None, :]
                    if FMA and BLOCK_M == 1:
                        # One row: products of the dequantized weights gathered per [k, output] in the weight
                        # tile's own layout and summed over k once, after the loop (a per-chunk sum over k crossed
                        # threads and warps through shared memory every iteration).
                        xv = tl.reshape(x.to(tl.float32), (BLOCK_K,))[:, None]
                        acc1_lo += xv * (lo * s_lo + z_lo)
                        acc1_hi += xv * (hi * s_hi + z_hi)
                    else:
                        # Scale and zero applied to the partial sums: x . (q s + z) = s (x . q) + z sum(x).
                        xsum = tl.reduce(x.to(tl.float32), 1, tl.standard._sum_combine)[:, None]
                        if FMA:  # products summed over K in registers (launch_plan.Config.fma)
                            xf = x.to(tl.float32)[:, :, None]
                            part_lo = tl.reduce(xf * lo[None, :, :], 1, tl.standard._sum_combine)
                            part_hi = tl.reduce(xf * hi[None, :, :], 1, tl.standard._sum_combine)
                        else:
                            part_lo = tl.dot(x, lo, input_precision="ieee")
                            part_hi = tl.dot(x, hi, input_precision="ieee")
                        acc_lo += part_lo * s_lo + xsum * z_lo
                        acc_hi += part_hi * s_hi + xsum * z_hi
                else:
                    # 16-bit dots: I4_OFF + q (the assembly decode on a GPU), dequantized in registers in the dot
                    # dtype (q s + z, as ops.dequantize rounds it), so no sum(x) term.
                    if len(I4_ASM) > 0:
                        lo, hi = tl.inline_asm_elementwise(I4_ASM, "=r,=r,h", [byte],
                                                           dtype=(x_ptr.dtype.element_ty, x_ptr.dtype.element_ty),
                                                           is_pure=True, pack=2)
                    else:
                        byte = byte.to(tl.int32)
                        lo = ((byte & 15) | I4_BITS).to(tl.int16).to(DOT_DT, bitcast=True)
                        hi = ((byte >> 4) | I4_BITS).to(tl.int16).to(DOT_DT, bitcast=True)
                    s_lo, z_lo = s_lo.to(DOT_DT)[None, :], z_lo.to(DOT_DT)[None, :]
                    s_hi, z_hi = s_hi.to(DOT_DT)[None, :], z_hi.to(DOT_DT)[None, :]
                    acc_lo += tl.dot(x, (lo - I4_OFF) * s_lo + z_lo, input_precision="ieee")
                    acc_hi += tl.dot(x, (hi - I4_OFF) * s_hi + z_hi, input_precision="ieee")
            else:
                wmask = (need & k_mask)[:, None] & n_mask[None, :]
                w = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], mask=wmask, other=0)
                if FMA:
                    if FMT == 0:  # int8 codes by their bits, as in dequant_matmul.py: 2**23 + 128 + c, exact
                        wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                    else:
                        wf = w.to(tl.float32)
                    acc += tl.reduce(x.to(tl.float32)[:, :, None] * wf[None, :, :], 1, tl.standard._sum_combine)
                else:
                    acc += tl.dot(x, w.to(DOT_DT), input_precision="ieee")
    if FMT == 1:
        if FMA and BLOCK_M == 1 and not COMPACT:
            acc_lo += tl.reduce(acc1_lo, 0, tl.standard._sum_combine)[None, :]
            acc_hi += tl.reduce(acc1_hi, 0, tl.standard._sum_combine)[None, :]
        first = (offs_j * 0 + k_lo) == 0  # a tensor: the interpreter refuses a scalar bool in a mask
        if HAS_BIAS:
            acc_lo += tl.load(b_ptr + 2 * offs_j, mask=j_mask & first, other=0.0).to(tl.float32)[None, :]
            acc_hi += tl.load(b_ptr + 2 * offs_j + 1, mask=j_mask & first, other=0.0).to(tl.float32)[None, :]
        # Outputs 2j / 2j + 1 interleaved into one [M, BLOCK_N] tile (the workspace, output and gated pairs'
        # order), so the epilogue is the other formats' one.
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue.finish(tl.reshape(tl.join(acc_lo, acc_hi), (BLOCK_M, BLOCK_N)), out_ptr, ws_ptr, cnt_ptr, 0, pid_n,
                         offs_m, offs_n, m_mask, offs_n < N, N, SPLITS, SPLIT, EPILOGUE, BLOCK_M, BLOCK_N)
    else:
        if FMT == 0:  # per-output scale: once on the accumulated dot
            acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            first = (offs_n * 0 + k_lo) == 0
            acc += tl.load(b_ptr + offs_n, mask=n_mask & first, other=0.0).to(tl.float32)[None, :]
        _epilogue.finish(acc, out_ptr, ws_ptr, cnt_ptr, 0, pid_n, offs_m, offs_n, m_mask, n_mask, N, SPLITS, SPLIT,
                         EPILOGUE, BLOCK_M, BLOCK_N)


def supported(x: torch.Tensor, weight_t: torch.Tensor, fmt: str, decode_only: bool) -> str | None:
    """None when the kernel takes this call, else why the eager path runs instead (the dense rule). Past
    DECODE_MAX_ROWS, or for a prefill with decode_only thresholds, quantized weights run launch's GEMM (the eager
    path would dequantize the whole weight per call); float ones the eager cuBLAS matmul."""
    if fmt not in _FMT:
        return f"no sparse kernel for format {fmt!r}"
    if x.dtype not in plan.DOT_DTYPES:
        return f"activation dtype {x.dtype} is not fp32/fp16/bf16"
    if fmt == "float" and decode_only and sparse_ops.is_prefill(x):
        return "prefill input with decode_only thresholds: dense path"
    rows = x.numel() // max(x.shape[-1], 1)
    if fmt == "float" and rows > sl.DECODE_MAX_ROWS:
        return f"{rows} rows > {sl.DECODE_MAX_ROWS}: every weight row is needed, dense path"
    return None


# A GEMM launch's tile (block_m by rows, block_n, block_k, warps, stages): dequant_matmul's prefill tile, with
# 128 int4 outputs so a weight row's load is 64 contiguous bytes. Untimed on a GPU.
def _gemm_tiles(m: int, fmt: str) -> tuple[int, int, int, int, int]:
    return (64 if m >= 64 else 32 if m >= 32 else 16), (128 if fmt == "int4" else 64), 64, 4, 3


def launch(x, threshold, weight_t, scales, zeros, bias, fmt: str, group_size: int,
           split_k: int | None = None, config: plan.Config | None = None, epilogue: str = "none",
           thresholded: bool = True) -> torch.Tensor:
    """Run the kernel on x [..., K]; the result is [..., N] in x's dtype, or [..., N / 2] with epilogue
    "silu_mul" (compiler/ops.py EPILOGUES), applied in the kernel's store. A decode GEMV up to DECODE_MAX_ROWS
    rows, else a GEMM: M tiles along the grid's third axis, one K split, dot tiles; also with ``thresholded``
    False (x as it is: a prefill with decode_only thresholds).
    split_k forces the K split (tests); config overrides the tile shape (benchmarks/kernels.py --sweep)."""
    k = x.shape[-1]
    n = weight_t.shape[1] * (2 if fmt == "int4" else 1)
    if epilogue not in qops.EPILOGUES or (epilogue != "none" and n % 2):
        raise ValueError(f"epilogue={epilogue!r} with N={n}: the epilogues are {qops.EPILOGUES}, on an even N")
    width = n // 2 if epilogue != "none" else n
    dev = x.device
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    gemm = m > sl.DECODE_MAX_ROWS or not thresholded  # only the GEMM's path has the unthresholded branch
    if not (m and n):
        return torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=dev)
    t = _ops.on_device(threshold, dev, f"{NAME} threshold").float()
    w = _ops.on_device(weight_t, dev, f"{NAME} weight")
    s = _ops.on_device(scales, dev, f"{NAME} scales") if scales is not None else t  # placeholders: float
    z = _ops.on_device(zeros, dev, f"{NAME} zeros") if zeros is not None else s
    b = _ops.on_device(bias, dev, f"{NAME} bias") if bias is not None else t
    interp = _ops.interpreting(dev)
    if gemm:  # the decode tables' buckets do not cover it; its own tile, no K split, no register tricks
        bm, bn, bk, warps, stages = _gemm_tiles(m, fmt)
        config, split_k = None, 1
    else:
        config = config if config is not None else plan.tuned("sparse", fmt, m, x.dtype, dev, (n, k))
        bn, bk, warps, stages = config[:4] if config is not None else plan.sparse_config(fmt, x.dtype)
        bm = plan.block_m(m, config)
    if fmt == "int4":
        bk = min(bk, group_size)  # one group per K chunk: the kernel scales each chunk's partial sums
    if config is not None and split_k is None:
        split_k = config.splits
    fma = plan.uses_fma(m, config)
    # Compact one-row fma launches (Config.compact; the kernel's COMPACT): K split at segment boundaries (an
    # int4 group; 128 channels otherwise), int4 read as int32 words of 8 outputs (N % 8 == 0).
    compact = plan.compacts(m, config) and (
        fmt != "int4" or (n % 8 == 0 and w.is_contiguous() and w.storage_offset() % 4 == 0))
    seg = group_size if fmt == "int4" else COMPACT_SEGMENT
    tiles = triton.cdiv(n, bn)
    ks = plan.k_split(tiles, k, seg if compact else bk, dev, split_k)
    # Axis 2 tiles M (gemm); the epilogue's split-K fixup counts tiles by pid_n alone, so gemm never splits K.
    grid = (tiles, triton.cdiv(k, ks), triton.cdiv(m, bm) if gemm else 1)
    out = torch.empty((m, width), dtype=x.dtype, device=dev)
    split = plan.SPLIT_FIXUP if ks < k else plan.SPLIT_NONE
    ws, cnt = plan.split_workspace(m, n, tiles, dev) if split else (t, t)
    # Config.flat: the whole split compacted up front into one list of ks entries (ks is whole segments), SEGS
    # segments at a time (at most FLAT_SEGS: one [SEGS, SEG] tile of x per step).
    flat = compact and bool(config.flat)
    segs = min(triton.next_power_of_2(ks // seg), FLAT_SEGS) if flat else 1
    if compact:
        w = w.view(torch.int32) if fmt == "int4" else w
        lists = plan.scratch_lists(grid[0] * grid[1] * (ks + FLAT_TAIL * bk if flat else 2 * seg), dev)
    else:
        lists = cnt  # unused placeholder
    dot_dt = plan.dot_dtype(x.dtype, interp)
    i4_bits, i4_off = plan.int4_offset(dot_dt)
    # Register double buffering (the kernel's PREFETCH): compacted launches, and one-row float / int8 fma ones
    # (the masked path), with stages >= 2; triton's own pipeliner only stages loads that feed a tl.dot.
    # A flat launch prefetches stages - 1 chunks ahead (at most 4).
    prefetch = min(stages - 1, 4) if flat else int(stages >= 2 and (compact or (fma and m == 1 and fmt != "int4")))
    # stages >= 3 on a per-segment compacted launch: the kept-row indices two chunks ahead as well (IDX_AHEAD).
    _ops.jit_variant(_sparse_kernel, interp)[grid](
        x2, t, w, s, z, b, out, ws, cnt, lists, m, n, k, ks, grid[1], FMT=_FMT[fmt], G=max(group_size, 1),
        PER_CHANNEL=t.numel() > 1, HAS_BIAS=bias is not None, DOT_DT=dot_dt, I4_BITS=i4_bits, I4_OFF=i4_off,
        I4_ASM=plan.int4_asm(dot_dt, interp), SPLIT=split, FMA=fma, COMPACT=compact, SEG=seg, PREFETCH=prefetch,
        IDX_AHEAD=compact and not flat and stages >= 3, FLAT=flat, SEGS=segs, TAIL=FLAT_TAIL * bk,
        EPILOGUE=int(epilogue != "none"), THRESHOLD=thresholded, SKIP_ROWS=m <= SKIP_ROWS_MAX,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1 if compact or prefetch else stages,
        **_ops.launch_options(dev))
    return out.view(*x.shape[:-1], width)


def run(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only, mode: int = 0,
        epilogue: str = "none"):
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton where supported), 1: Triton, 2: eager path."""
    if _ops.use_triton(mode, x.device) and supported(x, weight_t, fmt, decode_only) is None:
        thresholded = not (decode_only and sparse_ops.is_prefill(x))
        if thresholded and sparse_ops.measuring():  # the kernel does not count; count here only when asked to
            sparse_ops.record(label, sparse_ops.keep_mask(x, threshold), x.numel())
        out = launch(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, epilogue=epilogue,
                     thresholded=thresholded)
        path = "triton"
    else:
        out, path = qops.apply_epilogue(sl.sparse_linear_eager(x, threshold, weight_t, scales, zeros, bias, fmt,
                                                               group_size, label, decode_only), epilogue), "torch"
    _ops.count(NAME, path)
    return out


def reference(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label="", decode_only=False):
    return sl.reference(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only)


def kind_for(rows: int | None, fmt: str = "float") -> str:
    """explain()'s kernel kind: the GEMV up to DECODE_MAX_ROWS rows; past it a GEMM for quantized weights, the
    eager matmul (dense) for float ones; "a|b" when the rows are not static (either, by the call's rows)."""
    if rows is not None and rows <= sl.DECODE_MAX_ROWS:
        return "sparse-gemv"
    many = "dense" if fmt == "float" else "sparse-gemm"
    return many if rows is not None else "sparse-gemv|" + many


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, threshold: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor | None,
           zeros: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, group_size: int, label: str,
           decode_only: bool, mode: int, epilogue: str = "none") -> torch.Tensor:
        return run(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only, mode, epilogue)

    @op.register_fake
    def _fake(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only, mode, epilogue="none"):
        n = weight_t.shape[1] * (2 if fmt == "int4" else 1)
        return x.new_empty((*x.shape[:-1], n // (1 if epilogue == "none" else 2)))
