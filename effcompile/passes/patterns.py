"""Declarative passes: a pattern and its replacement, both written as eager PyTorch functions.

Patterns are traced with the same frontend as models (dynamo), so ``F.gelu(x)`` in a pattern is the
same node as ``F.gelu(x)`` inside a captured model. Matching and replacement use
``torch.fx.subgraph_rewriter.replace_pattern_with_filters``.

Example::

    def slow_gelu(x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))

    def fast_gelu(x):
        return torch.nn.functional.gelu(x)

    FuseGelu = rewrite("FuseGelu", slow_gelu, fast_gelu)
    model = effcompile(model, passes=[FuseGelu()])
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

MatchFilter = Callable[..., bool]  # (match, original_graph, pattern_graph) -> bool, as in torch.fx


@dataclass(frozen=True)
class Pattern:
    """An eager function traced to an fx graph, ready to match against the IR."""

    fn: Callable
    graph: fx.GraphModule


def _trace(fn: Callable, example_args: Sequence) -> fx.GraphModule:
    captured: list[fx.GraphModule] = []

    def backend(gm, _inputs):
        captured.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*example_args)
    if len(captured) != 1:
        raise ValueError(f"pattern {fn.__name__} traced to {len(captured)} graphs; it must be one graph")
    gm = captured[0]
    # Drop the module-stack metadata: patterns match by computation only.
    for n in gm.graph.nodes:
        n.meta.pop("nn_module_stack", None)
    return gm


def pattern(fn: Callable, *, example_args: Sequence | None = None) -> Pattern:
    """Trace ``fn`` into a matchable :class:`Pattern`.

    ``example_args`` default to one float tensor of shape (4, 8) per parameter of ``fn``; give your own
    when the pattern needs other shapes (e.g. a matmul).
    """
    if isinstance(fn, Pattern):
        return fn
    if not callable(fn):
        raise TypeError(f"pattern() needs a function, got {type(fn).__name__}")
    if example_args is None:
        n_args = len(inspect.signature(fn).parameters)
        example_args = [torch.randn(4, 8) for _ in range(n_args)]
    return Pattern(fn, _trace(fn, example_args))


def rewrite(
    name: str,
    pattern_fn: Callable | Pattern,
    replacement_fn: Callable | Pattern,
    *,
    match_filters: Sequence[MatchFilter] = (),
    example_args: Sequence | None = None,
    phase: str = "fuse",
    lossy: bool = False,
) -> type[PassConfig]:
    """Register a pass that replaces every match of ``pattern_fn`` by ``replacement_fn``.

    Returns the pass's config class; put an instance of it in ``passes=[...]``. Each match counts as
    one rewrite in explain(). ``match_filters`` are fx subgraph-rewriter filters
    ``(match, original_graph, pattern_graph) -> bool`` that can veto a match.
    """
    if not name.isidentifier():
        raise ValueError(f"rewrite name must be an identifier, got {name!r}")
    pat = pattern(pattern_fn, example_args=example_args)
    rep = pattern(replacement_fn, example_args=example_args)
    n_pat = sum(n.op == "placeholder" for n in pat.graph.graph.nodes)
    n_rep = sum(n.op == "placeholder" for n in rep.graph.graph.nodes)
    if n_pat != n_rep:
        raise ValueError(f"rewrite {name}: pattern takes {n_pat} tensors but replacement takes {n_rep}")

    # The rewrite's identity (a cache-key part) is the source of both functions: editing either one
    # must miss the cache, even though the pass function itself (below) never changes.
    fns = [f.fn if isinstance(f, Pattern) else f for f in (pattern_fn, replacement_fn)]
    try:
        text = "".join(inspect.getsource(f) for f in fns)
    except (OSError, TypeError):  # defined where no source is kept (a REPL): the cache is skipped
        text = None
    version = hashlib.sha256(text.encode()).hexdigest()[:16] if text is not None else None
    cfg_type = dataclasses.make_dataclass(
        name, [], bases=(PassConfig,), frozen=True,
        namespace={"lossy": lossy, "version": version, "__module__": fns[0].__module__},
    )
    filters = list(match_filters)

    def run(gm: fx.GraphModule, cfg: PassConfig, ctx: PassContext) -> PassResult:
        matches = replace_pattern_with_filters(gm, pat.graph, rep.graph, match_filters=filters)
        where = []
        for m in matches:  # nodes_map: pattern node -> matched original node (erased, meta intact)
            tags = [ir.sublayer(n) for p, n in m.nodes_map.items() if p.op not in ("placeholder", "output")]
            where += sorted({str(t) for t in tags if t is not None})[:1]
        return PassResult(modified=bool(matches), count=len(matches), where=where)

    run.__name__ = name
    run.__wrapped__ = fns[0]  # the key hashes the file that defines the pattern, not this one
    register_pass(cfg_type, phase=phase, name=name)(run)
    return cfg_type
