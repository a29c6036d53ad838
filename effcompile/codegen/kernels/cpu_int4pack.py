"""CPU int4 linear for bf16 / fp16 activations through torch's packed int4 matmul (aten._weight_int4pack_mm_for_cpu).

Weight-only int4 decode on the CPU otherwise runs the embedding-bag GEMV (cpu_bag_gemv.py), or for prefill
rows a dequantization and a matmul. For 16-bit activations torch's own int4 kernel is faster on the dev box
(AVX512, bf16): 3-4.5x the bag at one row and 5-9x at 8 rows (2048x768 to 8192x2048, g128), and at 128 rows
3.4 ms against ~4 ms to dequantize alone. For fp32 activations it is not (2048x768: 1.6 ms at one row, 220 ms
at 128 rows, against 4-7 ms for dequantize + matmul), so fp32 keeps the bag path.

Its format is tinygemm's: w = (q - 8) * scale + zero per (group, output), for codes q in 0..15; ours is
q * s + z, so zero = z + 8 s. The packed layout is torch's, built once at lowering
(aten._convert_weight_to_int4pack_for_cpu); it needs out_features divisible by 16.
"""

from __future__ import annotations

import torch

from effcompile.codegen import ops as _ops
from effcompile.compiler import ops as qops

NAME = "int4pack_linear"  # the custom op (effcompile::int4pack_linear) and its PATH_COUNTS key
DTYPES = (torch.bfloat16, torch.float16)
GROUPS = (32, 64, 128, 256)


def unavailable(x_dtype: torch.dtype, out_features: int, group_size: int) -> str | None:
    """None when torch's CPU int4 matmul takes this linear, else why not."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return "this torch build has no aten._weight_int4pack_mm_for_cpu"
    if x_dtype not in DTYPES:
        return f"activations are {x_dtype}: torch's int4 matmul is fast for bf16 / fp16 only"
    if out_features % 16:
        return f"out_features={out_features} is not a multiple of 16"
    if group_size not in GROUPS:
        return f"group_size={group_size} is not one of {GROUPS}"
    return None


def pack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
    """Quantize's int4 (qweight [N, K / 2] with the even K in the low nibble, scales and zeros [N, K / G]) ->
    (torch's packed weight, its scales-and-zeros [K / G, N, 2] in the activation dtype)."""
    n = qweight.shape[0]
    codes = torch.stack((qweight & 0xF, qweight >> 4), -1).reshape(n, -1).to(torch.int32)
    s, z = scales.float(), zeros.float()
    sz = torch.stack((s.t(), (z + 8 * s).t()), -1).to(dtype).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1), sz


def run(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
        group_size: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).to(scales_and_zeros.dtype).contiguous()
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    _ops.count(NAME, "cpu")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def reference(x, qweight, scales, zeros, bias, group_size):
    """The linear this op stands for: Quantize's int4 dequantized, then F.linear."""
    return qops.reference(x, qweight, scales, zeros, bias, "int4", group_size)


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
           group_size: int) -> torch.Tensor:
        return run(x, packed, scales_and_zeros, bias, group_size)

    @op.register_fake
    def _fake(x, packed, scales_and_zeros, bias, group_size):
        return x.new_empty((*x.shape[:-1], scales_and_zeros.shape[1]))
