"""IR op effcompile::sparse_linear: linear(sparsify(x)) with the weight stored input-major, so zeroed inputs skip rows.

A decode-time GEMV is bound by reading weights. When an input channel k is zero, weight column k is not
needed; stored input-major ([K, N], one contiguous row per input channel) that column is one contiguous
run of memory a kernel can skip. Layouts per format:

  float  weight_t [K, N] in the model's dtype
  int8   weight_t [K, N] int8, scales [N] (per output channel, as Quantize's int8)
  int4   weight_t [K, N // 2] uint8 (output channels 2j / 2j + 1 in the low / high nibble),
         scales and zeros [K // G, N] (Quantize's groups along K, transposed)

The eager path (where neither a Triton kernel nor the CPU bag GEMV takes a call) gathers only the active
rows (CHESS-style) for up to DECODE_MAX_ROWS rows, else dequantizes the whole weight and runs one matmul. A
float weight is gathered only when at most a third of its rows are needed: the gather copies the rows it
reads, so it reads and writes what a dense matmul only reads (CPU box, 1-8 rows: 1.8-9.5x slower than the
dense matmul with half the rows needed, 0.55-0.66x with a fifth).
"""

from __future__ import annotations

import torch

from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_ops

FORMATS = ("float", "int8", "int4")
DECODE_MAX_ROWS = 8  # rows up to which the row-skipping path runs; beyond it every column is needed anyway
FLOAT_GATHER_MAX = 1 / 3  # float rows gathered only when at most this share is needed (copy + matmul < dense)
# codegen's CPU int4 sparse GEMV (codegen/kernels/cpu_int4_gemv) registers its availability probe here on import:
# FuseSparseLinear needs to know whether it exists, and passes do not import codegen.
CPU_INT4_PROBE: list = []


def cpu_int4_kernel_unavailable() -> str | None:
    """None when codegen's CPU int4 sparse GEMV can run here, else why not."""
    return CPU_INT4_PROBE[0]() if CPU_INT4_PROBE else "codegen's CPU int4 GEMV is not loaded"


def to_input_major(weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None, fmt: str,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A float [N, K] weight, or Quantize's packed (qweight, scales, zeros), in the input-major layout."""
    if fmt == "float":
        return weight.detach().t().contiguous(), None, None
    if fmt == "int8":
        return weight.t().contiguous(), scales, None
    if fmt == "int4":
        codes = qops.unpack_int4(weight).t()  # [K, N]
        if codes.shape[1] % 2:
            raise ValueError(f"int4 input-major packing needs an even out_features, got {codes.shape[1]}")
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        return packed, scales.t().contiguous(), zeros.t().contiguous()
    raise ValueError(f"sparse_linear format {fmt!r} is not supported; supported: {list(FORMATS)}")


def rows_of(weight_t, scales, zeros, fmt: str, group_size: int, dtype: torch.dtype,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized input-major weight [len(rows) or K, N] in ``dtype`` (rounded like the reference)."""
    w = weight_t if rows is None else weight_t.index_select(0, rows)
    if fmt == "float":
        return w.to(dtype)
    if fmt == "int8":
        return (w.float() * scales.float()[None, :]).to(dtype)
    k_idx = torch.arange(weight_t.shape[0], device=w.device) if rows is None else rows
    codes = torch.stack((w & 0xF, w >> 4), dim=-1).view(w.shape[0], 2 * w.shape[1]).float()
    g = k_idx // group_size
    return (codes * scales.float()[g] + zeros.float()[g]).to(dtype)


def sparse_linear_eager(x, threshold, weight_t, scales, zeros, bias, fmt: str, group_size: int, label: str,
                        decode_only: bool) -> torch.Tensor:
    xs, applied = sparse_ops.threshold_input(x, threshold, label, decode_only)
    x2 = xs.reshape(-1, xs.shape[-1])
    n = weight_t.shape[1] * (2 if fmt == "int4" else 1)
    active = (x2 != 0).any(0).nonzero().squeeze(1) if applied and x2.shape[0] <= DECODE_MAX_ROWS else None
    if active is not None and (fmt != "float" or active.numel() <= FLOAT_GATHER_MAX * x2.shape[1]):
        y = x2.index_select(1, active) @ rows_of(weight_t, scales, zeros, fmt, group_size, x.dtype, active)
    else:
        y = x2 @ rows_of(weight_t, scales, zeros, fmt, group_size, x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


def reference(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only) -> torch.Tensor:
    """The op's definition: F.linear of the thresholded input with the dequantized weight."""
    xs, _ = sparse_ops.threshold_input(x, threshold, label, decode_only)
    w = rows_of(weight_t, scales, zeros, fmt, group_size, x.dtype).t()
    return torch.nn.functional.linear(xs, w, None if bias is None else bias.to(x.dtype))


if not hasattr(torch.ops.effcompile, "sparse_linear"):

    @torch.library.custom_op("effcompile::sparse_linear", mutates_args=())
    def sparse_linear(x: torch.Tensor, threshold: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor | None,
                      zeros: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, group_size: int, label: str,
                      decode_only: bool, epilogue: str = "none") -> torch.Tensor:
        """linear(sparsify(x, threshold), W) with W input-major (see the module docstring), then the
        epilogue (compiler/ops.py EPILOGUES)."""
        return qops.apply_epilogue(sparse_linear_eager(x, threshold, weight_t, scales, zeros, bias, fmt, group_size,
                                                       label, decode_only), epilogue)

    @sparse_linear.register_fake
    def _sparse_linear_fake(x, threshold, weight_t, scales, zeros, bias, fmt, group_size, label, decode_only,
                            epilogue="none"):
        n = weight_t.shape[1] * (2 if fmt == "int4" else 1)
        return x.new_empty((*x.shape[:-1], n // (1 if epilogue == "none" else 2)))


def sparse_linear_op():
    """The OpOverload the fuse pass inserts (``torch.ops.effcompile.sparse_linear.default``)."""
    return torch.ops.effcompile.sparse_linear.default


def linear_epilogue(node) -> str | None:
    """The output epilogue (ops.EPILOGUES) of a wq_linear / sparse_linear graph node, "none" when it has none
    (it is the ops' last argument: 9th of wq_linear, 11th of sparse_linear); None for any other node."""
    if getattr(node, "op", None) != "call_function" or node.target not in (qops.wq_linear_op(), sparse_linear_op()):
        return None
    at = 8 if node.target is qops.wq_linear_op() else 10
    return node.args[at] if len(node.args) > at else node.kwargs.get("epilogue", "none")


__all__ = ["DECODE_MAX_ROWS", "FORMATS", "linear_epilogue", "reference", "rows_of", "sparse_linear_eager", "sparse_linear_op",
           "to_input_major"]
