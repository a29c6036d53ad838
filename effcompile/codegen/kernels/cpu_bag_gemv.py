"""CPU decode GEMV as an embedding bag: torch's (FBGEMM) embedding-bag ops sum only the weight rows of nonzero inputs.

y = x @ W^T with W stored input-major is y = sum_k x_k * W^T[k, :], which is exactly an embedding bag
with per-sample weights over the rows k where x_k != 0. torch's CPU embedding-bag kernels (float, and
FBGEMM's row-wise quantized byte / 4-bit ones) read only those rows, vectorised, so on CPU they are both
the fast int8/int4 decode GEMV torch lacks and the row-skipping kernel activation sparsity needs.

Row layouts (built once by ``pack`` at lowering time from sparse_linear's input-major layout):

  float  [K, N] in the weight dtype: sparse_linear's layout as it is.
  int8   [K, N + 8] uint8: codes + 128, then the row's fp32 (scale, bias) = (1, -128), which turns
         each row back into the int8 codes exactly; the per-output-channel scales multiply afterwards.
  int4   [K, N/2 + 4] uint8: sparse_linear's packed int4 row (output 2j in the low nibble, FBGEMM's
         order too), then fp16 (scale, bias) = (1, 0). Quantize's scales/zeros vary per (group, output),
         which a per-row scale cannot express, so each K-group is its own bag and the group partial sums
         P[g] are combined afterwards: y = sum_g scales[g] * P[g] + zeros[g] * sum_{k in g} x_k.

A float / int8 call cuts each row's kept inputs into bags of at most BAG_INPUTS inputs and adds their partial sums:
FBGEMM's kernel walks a bag's output in register-sized blocks, one pass over all of the bag's rows per block, so a bag of
a thousand 8-64 KB rows is a thousand interleaved strided streams the prefetcher cannot follow. With 32 rows a bag it
streams. Session 23, against one bag per thread (same box, weights from DRAM): Llama-3.2-1B's four GEMV shapes at one
row 1.0-1.9x faster per call (median ~1.2x; benchmarks/results/sparse-cpu-1b-stream-2026-11-28-s23.json against -s22),
and llama-1b fp32 decode, A/B in one process (cpu-bag-inputs-ab-2026-11-28-s23.json): 50 % thresholds 1.07x -> 1.13x
eager, int8 1.45x -> 1.61x, 50 % + int8 1.82x -> 1.92x. Bags run in parallel, so the cut also fills the threads; a
weight under ROW_SPLIT_MIN_WEIGHTS (cache-resident) stays one bag per row.

Above max_rows(fmt, weight dtype) activation rows (BAG_MAX_ROWS; 4 for bf16 / fp16 float weights) every weight row is needed anyway (prefill), or a float bag per
row loses to one sgemm (measured: 8 rows of 4096 x 11008 at 50 % sparsity, 0.77x dense): the same buffers
are dequantized and multiplied densely. Quantized bags still win at 8 rows (int8 1.7-4.3x
fp32 dense, benchmarks/results/sparse-cpu-2026-11-26.json), since the alternative is a dequantization.
"""

from __future__ import annotations

import torch

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import cpu_float_gemv
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler import sparse_ops

NAME = "bag_linear"  # the custom op (effcompile::bag_linear) and its PATH_COUNTS key
FORMATS = ("float", "int8", "int4")
# Activation rows up to which the bag path runs; float calls of up to cpu_float_gemv.MAX_ROWS (8) rows run its C kernel
# instead where it builds, and these limits hold only where it does not.
BAG_MAX_ROWS = {"float": 1, "int8": 8, "int4": 8}
# bf16 / fp16 float weights: one bag per row still wins at 2-4 rows, since the dense matmul of the input-major half
# weight is a slow path (llama-1b shapes, 50 % kept, from DRAM: gate_up 2 rows 2.70 vs 5.70 ms, 4 rows 4.47 vs 5.74,
# 8 rows 7.95 vs 6.37; down 1.69 vs 3.60, 2.88 vs 3.36, 4.72 vs 3.02).
HALF_FLOAT_BAG_MAX_ROWS = 4
FLOAT_BAG_MIN_WEIGHTS = 1 << 21  # float weights smaller than this (8 MB fp32) stay in cache: sgemv beats the bag
# Float weights smaller than this skip the C kernel too (0: any size takes it). Small weights took the dense branch
# until session 26, whose matmul of the input-major weight plus the thresholding cost 2x the kernel's call there
# (bf16, one row, MiniLM / stdlib-LM shapes, cache-resident: 0.09-0.19 vs 0.04-0.06 ms; fp32 0.05-0.18 vs 0.03-0.06).
# Whole model, llama-small (256 wide) at 50 % thresholds, A/B in one process (cpu-small-weights-ab-*-s26.json), vs
# eager: bf16 batch 1 0.81x -> 1.12x, batch 8 0.73x -> 0.98x; fp32 batch 1 0.71x -> 0.81x, batch 8 0.69x -> 0.76x.
KERNEL_MIN_WEIGHTS = 0
# A float bag reads a kept row at ~20 GB/s where sgemv streams every row at ~28 (2-core box, weights from DRAM), so it
# pays only when few enough inputs are kept. Past this share of kept inputs a call runs the dense matmul of the
# thresholded x instead (per call: the keep mask is computed anyway). Whole model, llama-1b fp32, 32-input bags
# (bag_ab.py, medians of 4, cpu-bag-max-kept-ab-2026-11-28-s23.json): 40 % thresholds 0.96x eager at 0.55, 1.01x at
# 0.65 and with no limit; 25 % 0.96x at 0.55 and 0.70, 0.88x at 0.80 and with no limit. fp32 weights only: a bf16 /
# fp16 bag beats the dense matmul even with every input kept (llama-1b gate_up, one row, from DRAM: bf16 1.03x,
# fp16 1.95x), and the dense matmul on the input-major half weight is a slow path (bf16 at one row 2.2x slower than
# F.linear on the output-major one); llama-1b bf16 decode at 25 % thresholds: 0.59x eager with the limit, 1.25x
# without (same file). With the C kernel (session 25) the limit holds for one fp32 row only: with every input kept the
# kernel is 0.81-0.84x sgemv there, ~1.0x at 75 % kept, 1.27-1.38x at 60 %; with several fp32 rows it beats the
# input-major sgemm at any share (sparse-cpu-1b-stream-float-raw-2026-11-28-s25.json).
FLOAT_BAG_MAX_KEPT = 0.65
ROW_SPLIT_MIN_WEIGHTS = 1 << 21  # below this a bag takes ~0.1 ms: waking a second thread costs more than it saves
# Kept inputs per float / int8 bag at most: llama-1b's layer shapes ran alike at 16-64 and slower from 128 up; its
# 128256-wide int8 head only at 32 (7.6 ms at 50 % kept, 8.3 at 24, 12.6 at 48, from DRAM).
BAG_INPUTS = 32
# Several activation rows: bags ordered by input range, then row (_bags_by_chunk), so a range's weight rows come from
# DRAM once for all the rows (row-major, each row re-read them); False: row-major. Whole model, A/B in one process
# (session 24, cpu-bag-chunk-major-ab-*-s24.json): fp32 int8 at batch 8 0.85x -> 1.37x eager; bf16 50 % thresholds at
# batch 4 0.73x -> 0.86x. Kept inputs per bag at most, then: int8 at 8 rows was 2x faster with 64 than with 32 (the
# partial sums of 32-input bags, chunks x rows x N fp32, outgrew the caches), bf16 float best at 32.
CHUNK_MAJOR = True
CHUNK_INPUTS = {"float": 32, "int8": 64}
# Float calls of 1-8 rows run cpu_float_gemv's C kernel where it builds (False: the float bag). Whole model, llama-1b at
# 50 % thresholds, A/B in one process (session 25, cpu-float-kernel-ab-*-s25.json), vs eager: bf16 batch 1 1.47x ->
# 1.61x, batch 4 0.82x -> 1.12x, batch 8 0.66x -> 0.97x; fp32 batch 1 1.06x (the float bag) -> 1.29x, batch 8 (the
# input-major sgemm) 1.20x -> 1.70x.
FLOAT_KERNEL = True
# int8 calls of 1-8 rows run the same kernel on the byte rows (False: FBGEMM's byte bag; lowering then keeps torch's
# packed int8 matmul for 16-bit activations). Whole model, llama-1b, A/B in one process, a model compiled per variant
# (session 25, cpu-int8-kernel-ab-*-s25.json), vs eager: int8 bf16 batch 1 1.36x -> 1.58x, batch 8 0.73x -> 1.06x;
# fp32 batch 1 1.57x -> 1.69x, batch 8 1.31x -> 2.08x; 50 % thresholds + int8 bf16 batch 1 1.84x -> 2.15x.
INT8_KERNEL = True
_QOPS = {"int8": "embedding_bag_byte_rowwise_offsets", "int4": "embedding_bag_4bit_rowwise_offsets"}
_INT8_TAIL = torch.tensor([1.0, -128.0], dtype=torch.float32).view(torch.uint8)  # (scale, bias) per row
_INT4_TAIL = torch.tensor([1.0, 0.0], dtype=torch.float16).view(torch.uint8)


def row_kernel(fmt: str, weight_dtype: torch.dtype, m: int = 1) -> bool:
    """Whether a float / int8 call of ``m`` activation rows runs cpu_float_gemv's C kernel (else the bag)."""
    on = {"float": FLOAT_KERNEL, "int8": INT8_KERNEL}.get(fmt, False)
    return on and weight_dtype in cpu_float_gemv.WEIGHT_TYPES and m <= cpu_float_gemv.MAX_ROWS \
        and cpu_float_gemv.unavailable() is None


def max_rows(fmt: str, weight_dtype: torch.dtype) -> int:
    """Activation rows up to which a call of this format and weight dtype takes the bag path (or the float kernel)."""
    if row_kernel(fmt, weight_dtype):
        return cpu_float_gemv.MAX_ROWS
    half = fmt == "float" and weight_dtype in (torch.bfloat16, torch.float16)
    return HALF_FLOAT_BAG_MAX_ROWS if half else BAG_MAX_ROWS[fmt]


def unavailable(fmt: str) -> str | None:
    """None when this torch build has the embedding-bag op the format needs, else why not."""
    if fmt not in FORMATS:
        return f"no bag GEMV for format {fmt!r}; supported: {list(FORMATS)}"
    if fmt in _QOPS and not hasattr(torch.ops.quantized, _QOPS[fmt]):
        return f"this torch build has no quantized::{_QOPS[fmt]}"
    return None


def row_splits(rows: torch.Tensor, m: int, fmt: str, most_kept: int, threads: int | None = None) -> int:
    """Bags per activation row of a float / int8 call whose fullest row keeps ``most_kept`` inputs: bags of at most
    BAG_INPUTS inputs, and at least one per thread (int4 has one bag per K-group already)."""
    if fmt == "int4" or rows.numel() < ROW_SPLIT_MIN_WEIGHTS:
        return 1
    per_bag = BAG_INPUTS if m <= 1 or not CHUNK_MAJOR else CHUNK_INPUTS[fmt]
    return max(1, (threads or torch.get_num_threads()) // max(m, 1), -(-most_kept // per_bag))


def pack(weight_t: torch.Tensor, fmt: str) -> torch.Tensor:
    """sparse_linear's input-major weight ([K, N], or [K, N/2] packed int4) -> the bag rows above."""
    k = weight_t.shape[0]
    if fmt == "int4":
        return torch.cat([weight_t, _INT4_TAIL.expand(k, 4)], 1).contiguous()
    if fmt == "float":
        return weight_t.contiguous()
    codes = (weight_t.to(torch.int16) + 128).to(torch.uint8)
    return torch.cat([codes, _INT8_TAIL.expand(k, 8)], 1).contiguous()


def unpack(rows: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of ``pack``: sparse_linear's input-major weight (int8 as int8 codes)."""
    if fmt == "int4":
        return rows[:, :-4].contiguous()
    return rows if fmt == "float" else (rows[:, :-8].to(torch.int16) - 128).to(torch.int8)


def _dense(x2, rows, scales, zeros, fmt, group_size) -> torch.Tensor:
    """Every row needed (prefill): one matmul on the rows (float), else dequantize + matmul."""
    if fmt == "float":
        return x2 @ rows.to(x2.dtype)
    if fmt == "int8":  # codes = bytes - 128, one conversion pass, the scales on the output
        # (unscaled sums reach 127 * sum|x|: past fp16's range, so fp16 inputs accumulate in fp32)
        dt = torch.float32 if x2.dtype == torch.float16 else x2.dtype
        return ((x2.to(dt) @ (rows[:, :-8].to(dt) - 128)) * scales.to(dt)).to(x2.dtype)
    return x2 @ sl.rows_of(unpack(rows, fmt), scales, zeros, fmt, group_size, x2.dtype)


def _bags(x2: torch.Tensor, keep: torch.Tensor, width: int, splits: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, offsets, per-sample weights) for the inputs ``keep`` marks: one bag per run of ``width`` inputs of
    each row, each cut into ``splits`` consecutive bags (the last ones empty when a run keeps fewer inputs)."""
    k = x2.shape[1]
    flat = keep.reshape(-1).nonzero().squeeze(1)  # row-major: bag by bag, ascending inside each bag
    w = x2.reshape(-1).index_select(0, flat)
    idx = flat if x2.shape[0] == 1 else flat % k  # flat = row * K + column: the weight row to read is flat % K
    counts = keep.reshape(-1, width).sum(1)
    off = counts.cumsum(0) - counts
    if splits > 1:
        step = (counts + splits - 1) // splits
        cut = torch.arange(splits, device=flat.device) * step[:, None]
        off = (off[:, None] + torch.minimum(cut, counts[:, None])).view(-1)
    return idx, off, w


def _bags_by_chunk(x2: torch.Tensor, keep: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, offsets, per-sample weights) for the inputs ``keep`` marks, cut into ``chunks`` equal input ranges
    and ordered chunk-major: bag c * m + r is row r's kept inputs of range c, so the weight rows of one range are
    read from DRAM once and from cache for the other activation rows (row-major, every row re-read them)."""
    m, k = x2.shape
    width = -(-k // chunks)
    pad = chunks * width - k
    if pad:
        keep, x2 = torch.nn.functional.pad(keep, (0, pad)), torch.nn.functional.pad(x2, (0, pad))
    kt = keep.view(m, chunks, width).transpose(0, 1)  # [chunk, row, column]
    flat = kt.reshape(-1).nonzero().squeeze(1)  # ascending (chunk, row, column)
    w = x2.view(m, chunks, width).transpose(0, 1).reshape(-1).index_select(0, flat)
    idx = flat // (m * width) * width + flat % width
    counts = kt.sum(2).reshape(-1)
    return idx, counts.cumsum(0) - counts, w


def _bag(x2, keep, rows, scales, zeros, fmt, group_size) -> torch.Tensor:
    m, k = x2.shape
    if fmt == "int4":
        idx, off, w = _bags(x2, keep, group_size)
        p = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(rows, idx, off, False, 0, False, w.float())
        p = p.view(m, k // group_size, -1)
        xg = torch.where(keep, x2, 0).float().view(m, k // group_size, group_size).sum(2)
        return torch.einsum("bgn,gn->bn", p, scales.float()) + xg @ zeros.float()
    if m == 1:  # decode: the same bags as _bags builds, in a third of the small ops (~50 us a call less)
        idx = keep.view(-1).nonzero().squeeze(1)
        splits = row_splits(rows, 1, fmt, idx.numel())
        step = max(1, -(-idx.numel() // splits))
        off = torch.arange(0, splits * step, step, device=idx.device).clamp_(max=idx.numel())
        w = x2.view(-1).index_select(0, idx)
        chunked = False
    else:
        splits = row_splits(rows, m, fmt, int(keep.sum(1).max()))
        chunked = CHUNK_MAJOR and splits > 1
        idx, off, w = _bags_by_chunk(x2, keep, splits) if chunked else _bags(x2, keep, k, splits)
    if fmt == "float":
        y = torch.ops.aten._embedding_bag_forward_only(rows, idx, off, False, 0, False, w.to(rows.dtype))[0]
    else:
        y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(rows, idx, off, False, 0, False, w.float())
    if chunked:
        y = y.view(splits, m, -1).sum(0)
    elif splits > 1:
        y = y.view(m, splits, -1).sum(1)
    return y if fmt == "float" else y * scales.float()


def run(x, threshold, rows, scales, zeros, bias, fmt: str, group_size: int, label: str,
        decode_only: bool) -> torch.Tensor:
    """threshold None: a dense quantized linear (exact zeros still skip their rows); else sparse_linear."""
    applied = threshold is not None and not (decode_only and sparse_ops.is_prefill(x))
    x2 = x.reshape(-1, x.shape[-1])
    decode = x2.shape[0] <= max_rows(fmt, rows.dtype) and (applied or threshold is None)
    # Small float weights stay in cache, where sgemv beats the float bag's ~0.07 ms of set-up (768 x 2048: 0.10 vs
    # 0.13 ms); the C kernel's call beats both (KERNEL_MIN_WEIGHTS).
    small = fmt == "float" and rows.numel() < FLOAT_BAG_MIN_WEIGHTS
    kernel_size = not (fmt == "float" and rows.numel() < KERNEL_MIN_WEIGHTS)
    if decode and kernel_size and x2.numel() and row_kernel(fmt, rows.dtype, x2.shape[0]):
        # The C kernel on the same rows, faster than the float / byte bag (cpu_float_gemv.py). Past the kept-share
        # limit one fp32 row runs sgemv instead. Several rows, half weights or int8 codes have no faster path at any
        # share: the matmul of the input-major weight (or its dequantization) is slower than the kernel with every
        # input kept (cpu_float_gemv.py).
        if applied and sparse_ops.measuring():
            sparse_ops.record(label, sparse_ops.keep_mask(x, threshold), x.numel())
        one_fp32 = fmt == "float" and rows.dtype == torch.float32 and x2.shape[0] == 1
        share = min(FLOAT_BAG_MAX_KEPT, 1) if one_fp32 else 1
        y = cpu_float_gemv.call(x2, threshold if applied else None, rows, int(share * x2.shape[1]),
                                n=out_features(rows, fmt))
        if y is not None:
            y, path = (y if fmt == "float" else y * scales.float()).to(x.dtype), "kernel"
        else:
            xs = torch.where(sparse_ops.keep_mask(x, threshold), x, 0) if applied else x
            y, path = _dense(xs.reshape(x2.shape), rows, scales, zeros, fmt, group_size), "dense"
    elif decode and not small and x2.numel() and unavailable(fmt) is None:
        # The bags come straight from the keep mask (|x| > t implies x != 0): no thresholded copy of x.
        keep = sparse_ops.keep_mask(x, threshold) if applied else x != 0
        if applied:
            sparse_ops.record(label, keep, keep.numel())
        if fmt == "float" and rows.dtype == torch.float32 and int(keep.sum()) > FLOAT_BAG_MAX_KEPT * keep.numel():
            y, path = _dense(torch.where(keep, x, 0).reshape(x2.shape), rows, scales, zeros, fmt, group_size), "dense"
        else:
            y, path = _bag(x2, keep.reshape(x2.shape), rows, scales, zeros, fmt, group_size).to(x.dtype), "bag"
    else:
        if applied:
            x, _ = sparse_ops.threshold_input(x, threshold, label, decode_only)
        y, path = _dense(x.reshape(x2.shape), rows, scales, zeros, fmt, group_size), "dense"
    _ops.count(NAME, path)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def out_features(rows: torch.Tensor, fmt: str) -> int:
    return 2 * (rows.shape[1] - 4) if fmt == "int4" else rows.shape[1] - (8 if fmt == "int8" else 0)


def kind_for(rows: int | None, fmt: str, weight_dtype: torch.dtype = torch.float32) -> str:
    return "cpu-bag-gemv" if rows is not None and rows <= max_rows(fmt, weight_dtype) else "cpu-bag-gemv|dense"


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, threshold: torch.Tensor | None, rows: torch.Tensor, scales: torch.Tensor | None,
           zeros: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, group_size: int, label: str,
           decode_only: bool) -> torch.Tensor:
        return run(x, threshold, rows, scales, zeros, bias, fmt, group_size, label, decode_only)

    @op.register_fake
    def _fake(x, threshold, rows, scales, zeros, bias, fmt, group_size, label, decode_only):
        return x.new_empty((*x.shape[:-1], out_features(rows, fmt)))
