"""One-row int4 GEMV loops of the dequant kernel (dequant_matmul.py, one row with fma tiles): the codes read as int32
words of 8 and decoded in registers, products summed over K once after the loop. Kernel helpers
(ops.kernel_helper) that the kernel calls for its one-row int4 branch; each returns the row's sums over its K
range for the tile's BLOCK_N outputs."""

from __future__ import annotations

import triton.language as tl

from effcompile.codegen import ops as _ops


@_ops.kernel_helper
def _words_of_chunk(q_ptr, col3, n3, offs_c, k, k_hi, K, EVEN: tl.constexpr):
    """One row's int4 chunk of several groups at K offset k (chunks_of_groups below): its int32 words
    [GPC, WK, N]. EVEN (the tiles divide N and K): no mask (a masked load costs a zeroing move or a select per
    register); else nothing past k_hi or N is read (as in the two helpers below)."""
    if EVEN:
        wm, wo = None, None
    else:
        wm, wo = (k // 8 + offs_c < k_hi // 8) & n3, 0
    return tl.load(q_ptr + col3 * (K // 8) + k // 8 + offs_c, mask=wm, other=wo)


@_ops.kernel_helper
def _x_of_chunk(xrow, offs_c, k, k_hi, EVEN: tl.constexpr, X_PAIRS: tl.constexpr):
    """The chunk's x for each nibble p as [GPC, WK, 1] (x[8 w + p]). X_PAIRS (bf16 x, 4-byte aligned): as fp32,
    two values per 4-byte load, a bf16 being the top half of its fp32: half the x loads, and no byte permute per
    value (sm_90 SASS of (32, 256, 4, 2): 365 -> 344 loop instructions under triton 3.6, 481 -> 422 under 3.9)."""
    xb = xrow + k + 8 * offs_c
    if EVEN:
        xm, xo, po = None, None, None
    else:
        xm, xo, po = k + 8 * offs_c < k_hi, 0.0, 0
    if X_PAIRS:
        pb = xb.to(tl.pointer_type(tl.int32))  # x[8 w + 2 j] in the low half of word j, x[8 w + 2 j + 1] in the high
        p0, p1 = tl.load(pb, mask=xm, other=po), tl.load(pb + 1, mask=xm, other=po)
        p2, p3 = tl.load(pb + 2, mask=xm, other=po), tl.load(pb + 3, mask=xm, other=po)
        hi = -65536  # 0xFFFF0000 as an int32
        x0, x1 = (p0 << 16).to(tl.float32, bitcast=True), (p0 & hi).to(tl.float32, bitcast=True)
        x2, x3 = (p1 << 16).to(tl.float32, bitcast=True), (p1 & hi).to(tl.float32, bitcast=True)
        x4, x5 = (p2 << 16).to(tl.float32, bitcast=True), (p2 & hi).to(tl.float32, bitcast=True)
        x6, x7 = (p3 << 16).to(tl.float32, bitcast=True), (p3 & hi).to(tl.float32, bitcast=True)
    else:
        x0, x1 = tl.load(xb, mask=xm, other=xo), tl.load(xb + 1, mask=xm, other=xo)
        x2, x3 = tl.load(xb + 2, mask=xm, other=xo), tl.load(xb + 3, mask=xm, other=xo)
        x4, x5 = tl.load(xb + 4, mask=xm, other=xo), tl.load(xb + 5, mask=xm, other=xo)
        x6, x7 = tl.load(xb + 6, mask=xm, other=xo), tl.load(xb + 7, mask=xm, other=xo)
    return x0, x1, x2, x3, x4, x5, x6, x7


@_ops.kernel_helper
def _scales_of_chunk(s_ptr, z_ptr, col3, n3, offs_g, k, k_hi, K, G: tl.constexpr, EVEN: tl.constexpr):
    """The chunk's groups' scales and zeros [GPC, 1, N]."""
    gi = col3 * (K // G) + k // G + offs_g
    if EVEN:
        g_mask, go = None, None
    else:
        g_mask, go = n3 & (k + offs_g * G < k_hi), 0.0
    return tl.load(s_ptr + gi, mask=g_mask, other=go), tl.load(z_ptr + gi, mask=g_mask, other=go)


@_ops.kernel_helper
def _chunk_of_groups(q_ptr, s_ptr, z_ptr, xrow, col3, n3, offs_c, offs_g, k, k_hi, K, G: tl.constexpr,
                     EVEN: tl.constexpr, X_PAIRS: tl.constexpr):
    """The chunk's words, its x for each nibble, then its scales and zeros (the helpers above)."""
    words = _words_of_chunk(q_ptr, col3, n3, offs_c, k, k_hi, K, EVEN)
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_of_chunk(xrow, offs_c, k, k_hi, EVEN, X_PAIRS)
    sg, zg = _scales_of_chunk(s_ptr, z_ptr, col3, n3, offs_g, k, k_hi, K, G, EVEN)
    return words, x0, x1, x2, x3, x4, x5, x6, x7, sg, zg


@_ops.kernel_helper
def chunks_of_groups(x_ptr, q_ptr, s_ptr, z_ptr, pid_m, offs_n, n_mask, k_lo, k_hi, K, K_SPLIT, G: tl.constexpr,
                     GPC: tl.constexpr, EVEN_NK: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr, X_PAIRS: tl.constexpr):
    """Chunks of GPC > 1 whole groups (BLOCK_K = GPC G): one_group_chunks' loop in a [group, word, output]
    tile, so scales and zeros stay one [GPC, 1, N] load per chunk. An output's codes in a chunk are then
    BLOCK_K / 2 contiguous bytes: 64-byte row segments (one group of 128) were the int4 tiles' access pattern
    where int8's 128-byte ones read ~2x faster on the H100 (session 10); the sweep decides. (The 3-D tile
    costs registers at GPC 1: 128 against 80 for (64, 128), sm_90 SASS.) The kernel's wait for the kernel
    before it (ops.wait_for_producers, PDL) is here: after the first chunk's weights with PREFETCH, else first."""
    WK: tl.constexpr = BLOCK_K // 8 // GPC  # words of one group in a chunk
    acc1 = tl.full((GPC, WK, BLOCK_N), 0.0, tl.float32)
    xrow = x_ptr + pid_m.to(tl.int64) * K
    offs_c = (tl.arange(0, GPC)[:, None] * WK + tl.arange(0, WK)[None, :])[:, :, None]  # word in chunk
    offs_g = tl.arange(0, GPC)[:, None, None]  # group in chunk
    col3 = offs_n.to(tl.int64)[None, None, :]
    n3 = n_mask[None, None, :]
    # 1.0's bits, held in a register: with both of a nibble's constants immediate (the mask and the or
    # below), ptxas spent two LOP3s on each, one with this (sm_90, triton 3.6: 470 -> 404 loop
    # instructions for (32, 256, 4, 2)). K_SPLIT is under 2**30, so the or adds nothing.
    one = 0x3F800000 | (K_SPLIT >> 30)
    # x[8 w + p] for nibble p as [group, word, 1] loads: each thread reads the x values its products need
    # (L1 hits), where one contiguous chunk split 8 ways moved x across threads through shared memory,
    # four barriers a chunk (sm_90 SASS, triton 3.6); unmasked when the tiles divide N and K (the helper).
    if PREFETCH:  # the first chunk's operands; each iteration then loads the next chunk's (see below)
        # The weights first: no kernel writes them, so with PDL they are read before waiting for the kernel
        # before this one (the caller's EARLY_WEIGHTS), overlapping the first round trip to memory with its end.
        words_n = _words_of_chunk(q_ptr, col3, n3, offs_c, k_lo, k_hi, K, EVEN_NK)
        _ops.wait_for_producers(PDL)
        x0_n, x1_n, x2_n, x3_n, x4_n, x5_n, x6_n, x7_n = _x_of_chunk(xrow, offs_c, k_lo, k_hi, EVEN_NK, X_PAIRS)
        s_n, z_n = _scales_of_chunk(s_ptr, z_ptr, col3, n3, offs_g, k_lo, k_hi, K, G, EVEN_NK)
    else:
        _ops.wait_for_producers(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # This chunk's operands, or with PREFETCH (register double buffering) the next chunk's, issued
        # before this chunk's arithmetic so every CTA keeps a chunk of weights in flight while it computes
        # (triton's pipeliner only stages loads that feed a tl.dot; num_stages does nothing to this loop).
        # With even tiles the prefetch after the last chunk reads that chunk again, not past it.
        k1 = k0 + BLOCK_K * PREFETCH
        if EVEN_NK:
            k1 = tl.where(k1 < k_hi, k1, k0)
        words_l, x0_l, x1_l, x2_l, x3_l, x4_l, x5_l, x6_l, x7_l, s_l, z_l = _chunk_of_groups(
            q_ptr, s_ptr, z_ptr, xrow, col3, n3, offs_c, offs_g, k1, k_hi, K, G, EVEN_NK, X_PAIRS)
        if PREFETCH:
            words, sg, zg = words_n, s_n, z_n
            x0, x1, x2, x3 = x0_n.to(tl.float32), x1_n.to(tl.float32), x2_n.to(tl.float32), x3_n.to(tl.float32)
            x4, x5, x6, x7 = x4_n.to(tl.float32), x5_n.to(tl.float32), x6_n.to(tl.float32), x7_n.to(tl.float32)
            words_n, s_n, z_n = words_l, s_l, z_l
            x0_n, x1_n, x2_n, x3_n, x4_n, x5_n, x6_n, x7_n = x0_l, x1_l, x2_l, x3_l, x4_l, x5_l, x6_l, x7_l
        else:
            words, sg, zg = words_l, s_l, z_l
            x0, x1, x2, x3 = x0_l.to(tl.float32), x1_l.to(tl.float32), x2_l.to(tl.float32), x3_l.to(tl.float32)
            x4, x5, x6, x7 = x4_l.to(tl.float32), x5_l.to(tl.float32), x6_l.to(tl.float32), x7_l.to(tl.float32)
        # The scale and zero are taken out of the sum over a word's 8 nibbles: sum_p x_p (v_p 16 s + z - 16 s)
        # = 16 s (sum_p x_p v_p) + (z - 16 s) (sum_p x_p), so a nibble costs a shift, a mask-or and one FMA,
        # and the scale and zero two FMAs a word, not one a nibble (sum_p x_p is one per word position,
        # shared by the thread's outputs; 502 -> 470 loop instructions, the same tile).
        s16 = 16.0 * sg.to(tl.float32)
        z16 = zg.to(tl.float32) - s16
        # Nibble p sits at bits 4p..4p+3; 0x780000 keeps bits 19..22 after the shift (>> is arithmetic,
        # the mask drops the sign copies).
        t = x0 * (((words << 19) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x1 * (((words << 15) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x2 * (((words << 11) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x3 * (((words << 7) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x4 * (((words << 3) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x5 * (((words >> 1) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x6 * (((words >> 5) & 0x780000) | one).to(tl.float32, bitcast=True)
        t += x7 * (((words >> 9) & 0x780000) | one).to(tl.float32, bitcast=True)
        acc1 += t * s16 + (((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))) * z16
    return tl.reduce(tl.reduce(acc1, 0, tl.standard._sum_combine), 0, tl.standard._sum_combine)


@_ops.kernel_helper
def one_group_chunks(x_ptr, q_ptr, s_ptr, z_ptr, pid_m, offs_n, n_mask, k_lo, k_hi, K, K_SPLIT, G: tl.constexpr,
                     PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chunks of one group at most (batch-1 decode): the launcher passes the codes as int32 words, 8
    consecutive K values each (the even K in the low nibble), and products accumulate in a [word, output]
    tile in the words' own layout, summed over K once after the loop: no per-chunk sum across threads and no
    byte extraction. A code q shifted into the top 4 mantissa bits of 1.0 is v = 1 + q / 16 (exact), so
    q s + z = v (16 s) + (z - 16 s): one FMA per weight with no offset subtraction (the cancellation is of
    16 s, 2**-20 s at most; dequant_matmul's low-bit trick cancels 2**23 s)."""
    col = offs_n.to(tl.int64)[None, :]
    acc1 = tl.full((BLOCK_K // 8, BLOCK_N), 0.0, tl.float32)
    one = 0x3F800000 | (K_SPLIT >> 30)  # in a register: one LOP3 a nibble (see chunks_of_groups)
    KW = K // 8
    xrow = x_ptr + pid_m.to(tl.int64) * K
    if PREFETCH:  # the first chunk's operands; each iteration then loads the next chunk's (see below)
        offs_w = k_lo // 8 + tl.arange(0, BLOCK_K // 8)
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        gi = offs_n.to(tl.int64) * (K // G) + k_lo // G
        words_n = tl.load(q_ptr + col * KW + offs_w[:, None], mask=(offs_w < k_hi // 8)[:, None] & n_mask[None, :],
                          other=0)
        xk_n = tl.load(xrow + offs_k, mask=offs_k < k_hi, other=0.0)
        s_n = tl.load(s_ptr + gi, mask=n_mask, other=0.0)
        z_n = tl.load(z_ptr + gi, mask=n_mask, other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            # Register double buffering: the next chunk's loads are issued before this chunk's arithmetic,
            # so every CTA keeps a chunk of weights in flight while it computes (triton's pipeliner only
            # stages loads that feed a tl.dot; num_stages does nothing to this loop).
            words, xk, sg, zg = words_n, xk_n.to(tl.float32), s_n, z_n
            offs_w = (k0 + BLOCK_K) // 8 + tl.arange(0, BLOCK_K // 8)
            offs_k = k0 + BLOCK_K + tl.arange(0, BLOCK_K)
            gi = offs_n.to(tl.int64) * (K // G) + (k0 + BLOCK_K) // G
            more = n_mask & (offs_n * 0 + k0 + BLOCK_K < k_hi)  # a tensor: the interpreter wants one
            words_n = tl.load(q_ptr + col * KW + offs_w[:, None], mask=(offs_w < k_hi // 8)[:, None] & more[None, :],
                              other=0)
            xk_n = tl.load(xrow + offs_k, mask=offs_k < k_hi, other=0.0)
            s_n = tl.load(s_ptr + gi, mask=more, other=0.0)
            z_n = tl.load(z_ptr + gi, mask=more, other=0.0)
        else:
            offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            w_mask = offs_w < k_hi // 8
            words = tl.load(q_ptr + col * KW + offs_w[:, None], mask=w_mask[:, None] & n_mask[None, :], other=0)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(xrow + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        # x[8 w + 4 a + 2 b + c] -> the 8 vectors x_p[w], p = 4 a + 2 b + c, by splitting c, b, then a.
        c0, c1 = tl.split(tl.reshape(xk, (BLOCK_K // 8, 2, 2, 2)))
        c0b0, c0b1 = tl.split(c0)
        c1b0, c1b1 = tl.split(c1)
        x0, x4 = tl.split(c0b0)
        x2, x6 = tl.split(c0b1)
        x1, x5 = tl.split(c1b0)
        x3, x7 = tl.split(c1b1)
        if PREFETCH:
            s16 = 16.0 * sg.to(tl.float32)[None, :]
            z16 = zg.to(tl.float32)[None, :] - s16
        else:
            gi = offs_n.to(tl.int64) * (K // G) + k0 // G
            s16 = 16.0 * tl.load(s_ptr + gi, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z16 = tl.load(z_ptr + gi, mask=n_mask, other=0.0).to(tl.float32)[None, :] - s16
        # Nibble p sits at bits 4p..4p+3; 0x780000 keeps bits 19..22 after the shift (>> is arithmetic,
        # the mask drops the sign copies).
        acc1 += x0[:, None] * ((((words << 19) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x1[:, None] * ((((words << 15) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x2[:, None] * ((((words << 11) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x3[:, None] * ((((words << 7) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x4[:, None] * ((((words << 3) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x5[:, None] * ((((words >> 1) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x6[:, None] * ((((words >> 5) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
        acc1 += x7[:, None] * ((((words >> 9) & 0x780000) | one).to(tl.float32, bitcast=True) * s16 + z16)
    return tl.reduce(acc1, 0, tl.standard._sum_combine)
