"""Fake-tensor metadata (``meta["val"]``) of IR nodes: a full propagation, and the incremental refresh run after passes.

A full FakeTensorProp of a 16-layer Llama graph (~1400 nodes) took ~2.9 s on the 2-core CPU box, and the pass
manager ran one after every pass that changed the graph: 14 of the 20 s effcompile spent on each of a decode
config's three graphs. A pass changes a few nodes, so ``refresh_meta`` recomputes only those and, downstream,
the nodes whose inputs' metadata actually changed. Each node remembers what its value was computed from (its
op, target and arguments: ``_FP``); a node whose fingerprint no longer matches, or that has no value, is
recomputed. With EFFCOMPILE_CHECKS=1 (tests, CI) every refresh is checked against a full propagation.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from effcompile import config

VAL = "val"  # torch's own key for a node's (fake) output (ir re-exports it and node_val)
_FP = "ec_meta_from"  # what the node's VAL was computed from (fingerprint below)


def node_val(node: fx.Node):
    """The node's (fake) output value, or None."""
    return node.meta.get(VAL, node.meta.get("example_value"))


def fake_mode_for(gm: fx.GraphModule, example_inputs=()):
    """The fake-tensor mode the graph's metadata lives in (dynamo's), or a fresh one."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    # The placeholders' own mode, not the ambient tracing context's: inside a backend call dynamo's
    # TracingContext can hold a different mode from the one that made the graph's example values.
    for n in gm.graph.nodes:
        v = node_val(n)
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return detect_fake_mode(list(example_inputs)) or FakeTensorMode(allow_non_fake_inputs=True)


class _Prop(FakeTensorProp):
    def get_attr(self, target, args, kwargs):
        # Buffers passes added (packed weights, thresholds) are real tensors: fake them in this mode.
        # Static shapes: a weight's size is not an input dimension (a symbolic N would make every
        # stride downstream symbolic).
        v = super().get_attr(target, args, kwargs)
        if isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor):
            return self._mode.from_tensor(v, static_shapes=True)
        return v


def _inputs(gm: fx.GraphModule, mode, example_inputs) -> list:
    args = []
    for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        v = node_val(p)
        if v is None and i < len(example_inputs):
            v = example_inputs[i]
        if isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor):
            v = mode.from_tensor(v)
        args.append(v)
    return args


def _arg_key(a):
    if isinstance(a, fx.Node):
        return ("%", a.name)
    if isinstance(a, torch.Tensor):  # a tensor constant: by identity (== on tensors is elementwise)
        return ("tensor", id(a))
    return a


def fingerprint(n: fx.Node) -> tuple:
    """What a node's value is computed from: op, target and arguments (input nodes by name)."""
    return (n.op, n.target, fx.node.map_aggregate(n.args, _arg_key), fx.node.map_aggregate(n.kwargs, _arg_key))


def _same_fp(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an argument that cannot be compared: treat the node as changed
        return False


def _describe(v) -> list:
    """A value's metadata as leaves: a tensor's shape, strides, dtype and device; sizes as ints or sympy expressions."""
    def size(x):
        return x.node.expr if isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool) else x

    out = []
    for x in pytree.tree_leaves(v):
        if isinstance(x, torch.Tensor):
            out.append((tuple(map(size, x.shape)), tuple(map(size, x.stride())), x.dtype, x.device.type))
        else:
            out.append(size(x))
    return out


def _same_leaf(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_leaf(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        a, b = sympy.sympify(a), sympy.sympify(b)
        # The same size may be spelled two ways (dynamo's s0**2 + s0*s1, a propagation's s0*(s0 + s1)).
        return a == b or (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and sympy.expand(a - b) == 0)
    return type(a) is type(b) and a == b


def _same_val(a, b) -> bool:
    if a is None or b is None:
        return a is b
    try:
        da, db = _describe(a), _describe(b)
        return len(da) == len(db) and all(_same_leaf(x, y) for x, y in zip(da, db, strict=True))
    except Exception:  # noqa: BLE001 - incomparable values: changed
        return False


def record_fingerprints(gm: fx.GraphModule) -> None:
    """Mark every node's current value as computed from the node as it is now."""
    for n in gm.graph.nodes:
        n.meta[_FP] = fingerprint(n)


def propagate_meta(gm: fx.GraphModule, example_inputs=()) -> None:
    """Recompute ``meta["val"]`` for every node."""
    mode = fake_mode_for(gm, example_inputs)
    with mode:
        _Prop(gm, mode).propagate_dont_convert_inputs(*_inputs(gm, mode, example_inputs))
    record_fingerprints(gm)


def refresh_meta(gm: fx.GraphModule, example_inputs=()) -> int:
    """Recompute ``meta["val"]`` where a pass may have made it stale; returns how many nodes were recomputed.

    Recomputed: nodes without a value, nodes whose op, target or arguments changed since their value was
    computed, get_attr nodes whose tensor's shape, strides or dtype changed, and every node with an input
    whose recomputed value differs from the one it had."""
    mode = fake_mode_for(gm, example_inputs)
    prop = _Prop(gm, mode)
    changed: set[fx.Node] = set()
    done = 0
    placeholders = iter(_inputs(gm, mode, example_inputs))
    with mode:
        for n in gm.graph.nodes:
            if n.op == "output":
                continue
            old = n.meta.get(VAL)
            if n.op == "placeholder":
                prop.env[n] = next(placeholders)
                if old is None:
                    n.meta[VAL] = prop.env[n]
                n.meta[_FP] = fingerprint(n)
                continue
            stale = (old is None or _FP not in n.meta or not _same_fp(n.meta[_FP], fingerprint(n))
                     or any(a in changed for a in n.all_input_nodes))
            if not stale and n.op == "get_attr":
                stale = not _same_val(old, prop.fetch_attr(n.target))
            if not stale:
                prop.env[n] = old
                continue
            prop.env[n] = prop.run_node(n)
            done += 1
            n.meta[_FP] = fingerprint(n)
            if not _same_val(old, n.meta.get(VAL)):
                changed.add(n)
    if config.checks_enabled():
        _check_against_full(gm, example_inputs)
    return done


def _check_against_full(gm: fx.GraphModule, example_inputs) -> None:
    """EFFCOMPILE_CHECKS: the refreshed values equal what a full propagation computes (then kept)."""
    refreshed = {n: n.meta.get(VAL) for n in gm.graph.nodes}
    propagate_meta(gm, example_inputs)
    for n in gm.graph.nodes:
        if n.op != "output" and n.users and not _same_val(refreshed[n], n.meta.get(VAL)):
            from effcompile.compiler.ir import InvariantError  # here: ir imports this module

            raise InvariantError(f"refresh_meta left node {n.name} ({n.op} {n.target}) stale: "
                                 f"{_describe(refreshed[n])} where a full propagation gives {_describe(n.meta.get(VAL))}")
