"""Shared by the lowering modules (lower.py, lower_cpu.py): the kernel record and the row-count helpers."""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

from effcompile.compiler.ir import tensor_val

# {sympy symbol: largest size} of the shape bucket lower() is compiling for (see lower's symbol_bounds)
SYMBOL_BOUNDS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("effcompile_symbol_bounds", default=None)


@dataclass(frozen=True)
class KernelRecord:
    name: str
    op: str  # "torch.ops.effcompile.<name>.default"
    source_path: str
    kind: str  # "pointwise" | "reduction" | "epilogue" | "dequant-gemv" | "dequant-gemm" | "cache-write" | ...
    ops: tuple[str, ...]
    nodes: tuple[str, ...]  # original node names the kernel replaced
    sublayers: tuple[str, ...]


def static_rows(x) -> int | None:
    """Rows of activations a call will have, if the graph knows it (symbolic: picked per call)."""
    val = tensor_val(x)
    static = val is not None and all(isinstance(d, int) for d in val.shape[:-1])
    return math.prod(val.shape[:-1]) if static else None


def max_rows(x) -> int | None:
    """The most activation rows a call can have: the static count, else its symbolic sizes at the largest the
    shape bucket being compiled allows (lower's symbol_bounds); None when some size has no bound."""
    if (rows := static_rows(x)) is not None:
        return rows
    val, bounds = tensor_val(x), SYMBOL_BOUNDS.get()
    if val is None or not bounds:
        return None
    total = 1
    for d in val.shape[:-1]:
        if isinstance(d, int):
            total *= d
            continue
        expr = getattr(getattr(d, "node", None), "expr", None)
        hi = expr.subs(bounds) if expr is not None else None
        if hi is None or not getattr(hi, "is_Integer", False):
            return None
        total *= int(hi)
    return total
