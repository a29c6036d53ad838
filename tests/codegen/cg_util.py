"""Helpers for the codegen tests: capture a graph the way the compiler does, count node targets."""

from __future__ import annotations

import torch
import torch.fx as fx

from effcompile.compiler.ir import annotate


def capture_compiled(fn, *args, dynamic_dims: dict[int, int] | None = None):
    """torch.compile with a backend that keeps the fx graph. Returns (annotated graph, compiled fn).

    The backend returns a closure calling gm (not gm.forward, which would pin the pre-lowering code),
    so the compiled fn runs whatever gm holds after lower() rewrote it in place; graphs captured later
    (recompiles) are appended to the list and make the caller's assertion fail loudly.
    """
    graphs = []

    def backend(gm, example_inputs):
        annotate(gm, example_inputs)
        graphs.append(gm)
        return lambda *a: gm(*a)

    torch._dynamo.reset()
    if dynamic_dims:
        for i, d in dynamic_dims.items():
            torch._dynamo.mark_dynamic(args[i], d)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    compiled(*args)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0], compiled, graphs


def capture(fn, *args, dynamic_dims: dict[int, int] | None = None) -> fx.GraphModule:
    """The first annotated graph dynamo captures for fn(*args)."""
    return capture_compiled(fn, *args, dynamic_dims=dynamic_dims)[0]


def targets(gm: fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            out.append(
                n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            )
    return out
