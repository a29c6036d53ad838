"""Guards: does a call's arguments fit the shape buckets, dtypes and devices a graph was compiled for?"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .key import _size_hint, bucket_bounds, input_spec, stride_class


@dataclass(frozen=True)
class ArgSpec:
    """What one positional argument must look like. ``dims`` holds an int (static) or a (lo, hi)
    bucket (dynamic) per dimension; ``kind`` is "tensor", "symint" (dynamic int) or "value"."""

    kind: str
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    dims: tuple = ()
    stride: str | None = None
    bounds: tuple[int, int] | None = None  # symint
    value: Any = None  # value: compared with ==


def _fmt(b: tuple[int, int]) -> str:
    return f"{b[0]}-{b[1]}"


@dataclass(frozen=True)
class Guard:
    specs: tuple[ArgSpec, ...] = field(default_factory=tuple)

    def check(self, args: Sequence[Any]) -> str | None:
        """None if ``args`` may use the compiled graph, else the first reason it may not."""
        if len(args) != len(self.specs):
            return f"expected {len(self.specs)} args, got {len(args)}"
        for i, (spec, a) in enumerate(zip(self.specs, args, strict=True)):
            why = _check_one(i, spec, a)
            if why:
                return why
        return None

    def input_specs(self, args: Sequence[Any]) -> list[dict]:
        """The key's input specs for ``args`` (dynamic dims bucketed the same way this guard does)."""
        out = []
        for spec, a in zip(self.specs, args, strict=True):
            dyn = [d for d, x in enumerate(spec.dims) if isinstance(x, tuple)]
            out.append(input_spec(a, dynamic_dims=dyn) if spec.kind != "symint" else
                       {"kind": "symint", "bucket": _fmt(bucket_bounds(int(a)))})
        return out

    def __str__(self) -> str:
        parts = []
        for i, s in enumerate(self.specs):
            if s.kind == "tensor":
                dims = ", ".join(_fmt(d) if isinstance(d, tuple) else str(d) for d in s.dims)
                parts.append(f"arg {i}: {s.dtype} [{dims}] on {s.device} ({s.stride})")
            elif s.kind == "symint":
                parts.append(f"arg {i}: int in {_fmt(s.bounds)}")
            else:
                parts.append(f"arg {i}: == {s.value!r}")
        return "\n".join(parts)


def _check_one(i: int, spec: ArgSpec, a: Any) -> str | None:
    if spec.kind == "tensor":
        if not isinstance(a, torch.Tensor):
            return f"arg {i}: expected a tensor, got {type(a).__name__}"
        if a.dtype != spec.dtype:
            return f"arg {i}: dtype {a.dtype}, expected {spec.dtype}"
        if a.device != spec.device:
            return f"arg {i}: device {a.device}, expected {spec.device}"
        if a.dim() != len(spec.dims):
            return f"arg {i}: rank {a.dim()}, expected {len(spec.dims)}"
        for d, (want, got) in enumerate(zip(spec.dims, a.shape, strict=True)):
            if isinstance(want, tuple):
                if not want[0] <= got <= want[1]:
                    return f"arg {i} dim {d}: {got} not in bucket {_fmt(want)}"
            elif got != want:
                return f"arg {i} dim {d}: {got}, expected {want}"
        # Generated kernels index memory assuming the layout they were compiled for.
        sc = stride_class(a)
        if sc != spec.stride:
            return f"arg {i}: layout {sc}, expected {spec.stride}"
        return None
    if spec.kind == "symint":
        if isinstance(a, bool) or not isinstance(a, int | torch.SymInt):
            return f"arg {i}: expected an int, got {type(a).__name__}"
        if not spec.bounds[0] <= int(a) <= spec.bounds[1]:
            return f"arg {i}: {int(a)} not in bucket {_fmt(spec.bounds)}"
        return None
    if type(a) is not type(spec.value) or a != spec.value:
        return f"arg {i}: {a!r}, expected {spec.value!r}"
    return None


def dynamic_dims_of(values: Iterable[Any]) -> dict[int, tuple[int, ...]]:
    """Which dims are dynamic, read from fake values: a SymInt shape entry (or a SymInt arg, keyed
    with the empty tuple) is dynamic; a plain int was specialized by the tracer."""
    out: dict[int, tuple[int, ...]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            dyn = tuple(d for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt) and not _constant(s))
            if dyn:
                out[i] = dyn
        elif isinstance(v, torch.SymInt) and not _constant(v):
            out[i] = ()
    return out


def _constant(s: torch.SymInt) -> bool:
    try:
        return s.node.is_constant()
    except AttributeError:
        return False


def placeholder_values(gm: fx.GraphModule) -> list[Any]:
    """The fake values dynamo recorded on the graph's placeholders (``val`` or ``example_value``)."""
    return [n.meta.get("val", n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder"]


def make_guard(example_inputs: Sequence[Any], dynamic: Mapping[int, Iterable[int]] | None = None,
               fake_inputs: Sequence[Any] | None = None) -> Guard:
    """Build the guard for ``example_inputs``. Dynamic dims come from ``dynamic`` ({arg: dims}) or are
    read from ``fake_inputs`` (e.g. :func:`placeholder_values`); the rest must match exactly."""
    if dynamic is None:
        dynamic = dynamic_dims_of(fake_inputs if fake_inputs is not None else example_inputs)
    specs = []
    for i, x in enumerate(example_inputs):
        dyn_dims = dynamic.get(i)
        if isinstance(x, torch.Tensor):
            dyn = {int(d) % max(x.dim(), 1) for d in (dyn_dims or ())}
            dims = tuple(bucket_bounds(_size_hint(s)) if d in dyn or isinstance(s, torch.SymInt) else int(s)
                         for d, s in enumerate(x.shape))
            specs.append(ArgSpec("tensor", x.dtype, x.device, dims, stride_class(x)))
        elif isinstance(x, torch.SymInt) or (dyn_dims is not None and isinstance(x, int)):
            specs.append(ArgSpec("symint", bounds=bucket_bounds(_size_hint(x))))
        else:
            specs.append(ArgSpec("value", value=x))
    return Guard(tuple(specs))
