"""Helpers for the codegen tests: capture a graph the way the compiler does, count node targets."""

from __future__ import annotations

import torch
import torch.fx as fx

from effcompile.compiler.ir import annotate


def capture(fn, *args, dynamic_dims: dict[int, int] | None = None) -> fx.GraphModule:
    """torch.compile with a backend that keeps the fx graph; returns the first annotated graph."""
    graphs = []

    def backend(gm, example_inputs):
        annotate(gm, example_inputs)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    if dynamic_dims:
        for i, d in dynamic_dims.items():
            torch._dynamo.mark_dynamic(args[i], d)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]


def targets(gm: fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            out.append(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
    return out


def real_inputs(gm: fx.GraphModule, args):
    return args
