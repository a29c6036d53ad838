"""One-row helpers of the sparse GEMV (sparse_kernel.py): which channels a row keeps, the compacted lists of them,
and the products of their weight rows. Kernel helpers (ops.kernel_helper), inlined by the GPU compiler."""

from __future__ import annotations

import triton.language as tl

from effcompile.codegen import ops as _ops


@_ops.kernel_helper
def kept(x_ptr, t_ptr, offs_k, k_mask, PER_CHANNEL: tl.constexpr):
    """One row's x at channels offs_k and which of them it keeps: |x| above the channel's threshold (one for
    all, unless PER_CHANNEL), compared in the activation dtype as the reference does (|x| > t.to(x.dtype): an
    fp32 threshold between two bf16 values would flip channels that sit right at it)."""
    xk = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
    if PER_CHANNEL:
        t = tl.load(t_ptr + offs_k, mask=k_mask, other=0.0)
    else:
        t = tl.load(t_ptr + offs_k * 0)
    return xk, (tl.abs(xk.to(tl.float32)) > t.to(x_ptr.dtype.element_ty).to(tl.float32)) & k_mask


@_ops.kernel_helper
def kept_rows(x_ptr, t_ptr, w_ptr, offs_k, k_hi, offs_n, n_mask, N, PER_CHANNEL: tl.constexpr):
    """One row's chunk of input channels offs_k (the one-row masked path): x, which channels it keeps, and their
    weight rows (the skipped ones are never read; nothing past k_hi either)."""
    xk, keep = kept(x_ptr, t_ptr, offs_k, offs_k < k_hi, PER_CHANNEL)
    w = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], mask=keep[:, None] & n_mask[None, :],
                other=0)
    return xk, keep, w


@_ops.kernel_helper
def _per_nibble(ptr, gi, mask):
    """The values at gi + p for nibble p = 0..7 (output 8 w + p of int32 word w), one [BW] load each, in the
    layout the products use."""
    return (tl.load(ptr + gi, mask=mask, other=0.0), tl.load(ptr + gi + 1, mask=mask, other=0.0),
            tl.load(ptr + gi + 2, mask=mask, other=0.0), tl.load(ptr + gi + 3, mask=mask, other=0.0),
            tl.load(ptr + gi + 4, mask=mask, other=0.0), tl.load(ptr + gi + 5, mask=mask, other=0.0),
            tl.load(ptr + gi + 6, mask=mask, other=0.0), tl.load(ptr + gi + 7, mask=mask, other=0.0))


@_ops.kernel_helper
def group_scales(s_ptr, z_ptr, grp, N, offs_w, w_mask):
    """Group grp's scales s0..s7 and zeros z0..z7 of the tile's int4 words offs_w (nibble p: output 8 w + p), as
    stored: a [BW] load per nibble, already in the layout the products use (a [BW, 8] load split per nibble went
    through shared memory, two barriers per split)."""
    gi = grp * N + 8 * offs_w.to(tl.int64)  # grp * N < K / G * N, the scales' count
    s0, s1, s2, s3, s4, s5, s6, s7 = _per_nibble(s_ptr, gi, w_mask)
    z0, z1, z2, z3, z4, z5, z6, z7 = _per_nibble(z_ptr, gi, w_mask)
    return s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7


@_ops.kernel_helper
def affine(s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7):
    """Scales and zeros for codes decoded as v = 1 + q / 16 (int4_products): q s + z = v 16 s + (z - 16 s)."""
    s0, s1, s2, s3 = 16.0 * s0.to(tl.float32), 16.0 * s1.to(tl.float32), 16.0 * s2.to(tl.float32), \
        16.0 * s3.to(tl.float32)
    s4, s5, s6, s7 = 16.0 * s4.to(tl.float32), 16.0 * s5.to(tl.float32), 16.0 * s6.to(tl.float32), \
        16.0 * s7.to(tl.float32)
    z0, z1, z2, z3 = z0.to(tl.float32) - s0, z1.to(tl.float32) - s1, z2.to(tl.float32) - s2, z3.to(tl.float32) - s3
    z4, z5, z6, z7 = z4.to(tl.float32) - s4, z5.to(tl.float32) - s5, z6.to(tl.float32) - s6, z7.to(tl.float32) - s7
    return s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7


@_ops.kernel_helper
def int4_products(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, xv, words, one,
                  s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7):
    """acc_p [BLOCK_K, BW] plus xv [BLOCK_K, 1] times the dequantized nibble p of words [BLOCK_K, BW]. Nibble p
    shifted into the top of an fp32 mantissa and ORed with 1.0's bits (``one``, held in a register) is
    v = 1 + q / 16, so no integer-to-float conversion; (s, z) come from ``affine``. A zero word is v = 1, so
    padding rows must bring x = 0."""
    acc0 += xv * ((((words << 19) & 0x780000) | one).to(tl.float32, bitcast=True) * s0[None, :] + z0[None, :])
    acc1 += xv * ((((words << 15) & 0x780000) | one).to(tl.float32, bitcast=True) * s1[None, :] + z1[None, :])
    acc2 += xv * ((((words << 11) & 0x780000) | one).to(tl.float32, bitcast=True) * s2[None, :] + z2[None, :])
    acc3 += xv * ((((words << 7) & 0x780000) | one).to(tl.float32, bitcast=True) * s3[None, :] + z3[None, :])
    acc4 += xv * ((((words << 3) & 0x780000) | one).to(tl.float32, bitcast=True) * s4[None, :] + z4[None, :])
    acc5 += xv * ((((words >> 1) & 0x780000) | one).to(tl.float32, bitcast=True) * s5[None, :] + z5[None, :])
    acc6 += xv * ((((words >> 5) & 0x780000) | one).to(tl.float32, bitcast=True) * s6[None, :] + z6[None, :])
    acc7 += xv * ((((words >> 9) & 0x780000) | one).to(tl.float32, bitcast=True) * s7[None, :] + z7[None, :])
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@_ops.kernel_helper
def float_products(acc, xv, w, FMT: tl.constexpr):
    """acc [BLOCK_K, BLOCK_N] plus xv [BLOCK_K, 1] times the weight rows w: float, or int8 codes (FMT 0) read
    by their bits, 2**23 + 128 + c, exact (the per-output scale comes after the loop)."""
    if FMT == 0:
        wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        wf = w.to(tl.float32)
    return acc + xv * wf


@_ops.kernel_helper
def compact_segments(x_ptr, t_ptr, lists, s0, k_hi, length, PER_CHANNEL: tl.constexpr, SEGS: tl.constexpr,
                     SEG: tl.constexpr, PAD: tl.constexpr):
    """Append the kept channels of the SEGS segments of SEG channels from s0 (none past k_hi) to the list at
    ``lists``, which holds ``length`` entries: each segment's in channel order, then -1 up to a multiple of PAD
    (so a chunk of PAD entries never spans two segments, and only a pad follows a kept channel). Returns the
    new length. One load of x and one store for all SEGS segments, and no barrier: the caller has one after its
    last call, before any warp reads the list."""
    offs = s0 + tl.arange(0, SEGS)[:, None] * SEG + tl.arange(0, SEG)[None, :]
    keep = kept(x_ptr, t_ptr, offs, offs < k_hi, PER_CHANNEL)[1]
    ones = keep.to(tl.int32)
    rank = tl.associative_scan(ones, 1, tl.standard._sum_combine)  # kept channels of the segment up to here
    count = tl.reduce(ones, 1, tl.standard._sum_combine)
    padded = (count + PAD - 1) // PAD * PAD
    start = length + tl.associative_scan(padded, 0, tl.standard._sum_combine) - padded
    # A kept channel goes to slot rank - 1 of its segment's run; the j-th skipped one (j = lane - rank) to slot
    # count + j, which only the first padded - count of them fill.
    slot = tl.where(keep, rank - 1, count[:, None] + tl.arange(0, SEG)[None, :] - rank)
    tl.store(lists + start[:, None] + slot, tl.where(keep, offs, -1), mask=keep | (slot < padded[:, None]))
    return length + tl.reduce(padded, 0, tl.standard._sum_combine)


@_ops.kernel_helper
def list_chunk(lists, pos, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """Entries pos .. pos + BLOCK_K of a compacted list (-1 for pads; the list is followed by -1s as far as any
    chunk reads), and the int4 group of the chunk: its first entry's, never a pad in a list of whole chunks
    (compact_segments with PAD = BLOCK_K). Past the list's end the group is 0, which nothing uses."""
    idx = tl.load(lists + pos + tl.arange(0, BLOCK_K))
    return idx, tl.maximum(tl.load(lists + pos), 0) // G


@_ops.kernel_helper
def list_rows(idx, x_ptr, w_ptr, row_len, cols, cols_mask):
    """x and the weight rows (row_len elements each, the tile's columns) of the channels idx; -1 reads nothing
    and brings x = 0."""
    real = idx >= 0
    xv = tl.load(x_ptr + idx, mask=real, other=0.0)
    w = tl.load(w_ptr + idx.to(tl.int64)[:, None] * row_len + cols[None, :], mask=real[:, None] & cols_mask[None, :],
                other=0)
    return xv, w


@_ops.kernel_helper
def chunk_rows(lists, pos, G: tl.constexpr, BLOCK_K: tl.constexpr, x_ptr, w_ptr, row_len, cols, cols_mask):
    """x and weight rows of the list's chunk at pos (list_chunk, list_rows), and its int4 group."""
    idx, grp = list_chunk(lists, pos, G, BLOCK_K)
    xv, w = list_rows(idx, x_ptr, w_ptr, row_len, cols, cols_mask)
    return xv, w, grp
