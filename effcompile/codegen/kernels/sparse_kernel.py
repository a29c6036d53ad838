"""The sparse-activation GEMV kernel (launched by sparse_gemv.py): threshold x, then read only the weight rows
some activation row still needs; past the decode rows the same kernel runs as a GEMM over M tiles.

Weights are input-major (compiler/sparse_linear.py): row k of W^T holds every output's weight for input
channel k, contiguous, so when no activation row needs channel k the masked load of that row issues no
memory traffic. float, int8 (per-output scale) and int4 (groups along K, two outputs per byte) share the
kernel: the int4 variant is sparse activations x int4 weights in one pass over the packed bytes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import epilogue as _epilogue
from effcompile.codegen.kernels import sparse_rows

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
    # Decode grids have one program along axis 2; a prefill launch (sparse_gemv.launch's GEMM) tiles M there.
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
            # TAIL: -1s after the list (sparse_gemv.FLAT_TAIL chunks), so entry loads need no mask
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
