"""Fuse: quantized linears reading the same input (Q/K/V, gate/up) become one wq_linear, then slices (exact).

At decode a layer is a chain of small kernels; each costs a launch and a pipeline drain whatever it reads,
and a Llama-3.2-1B k/v projection (512 x 2048 int4, 0.5 MB) is too small to reach HBM speed alone. Linears
that share their input, weight format, group size, activation mode and sublayer are concatenated along N
once (packed codes, scales and zeros are row-major, so rows stack) and run as one kernel; each original
output is a slice (a view) of the fused one. Part of the default pipeline, after FuseSparseLinear.

Float linears are left alone: their weights are the model's parameters, and a concatenated copy would
double their memory. A quantized linear with an EoRA side path (its output feeds an add of
``linear(linear(x, A), B)``) is left alone too: codegen fuses that side path into its own kernel.
If any consumer cannot take the strided slices (shape propagation fails), the whole rewrite is undone
and the reason is reported.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler import ops as qops
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class FuseParallelLinears(PassConfig):
    """Concatenate quantized linears that share an input into one; part of the default pipeline.

    enabled=False leaves every linear as it is (pass ``FuseParallelLinears(enabled=False)`` to compare)."""

    enabled: bool = True


def _has_side_path(node: fx.Node) -> bool:
    """Whether an EoRA-style ``out + linear(linear(x, A), B)`` adds to this linear's output."""
    for user in node.users:
        if user.op == "call_function" and user.target in (operator.add, torch.add):
            other = [a for a in user.args if a is not node]
            if any(isinstance(a, fx.Node) and ir.target_name(a) == "linear" for a in other):
                return True
    return False


def _key(gm, node, ctx) -> tuple | str:
    """What must match for two wq_linears to fuse, or why this one cannot."""
    if node.kwargs or len(node.args) > 8:
        return "extra arguments this pass does not know"
    x, q, s, z, b, fmt, group = node.args[:7]
    act = node.args[7] if len(node.args) > 7 else "none"
    qt, st, zt = (ir.node_tensor(gm, t, ctx.params) for t in (q, s, z))
    if qt is None or st is None or (z is not None and zt is None):
        return "its quantized weight is not a graph buffer"
    if b is not None and ir.node_tensor(gm, b, ctx.params) is None:
        return "its bias is not a parameter or buffer"
    if _has_side_path(node):
        return "an EoRA side path adds to its output (fused into its own kernel)"
    return (x, fmt, group, act, str(ir.sublayer(node)), qt.dtype, tuple(qt.shape[1:]), st.dtype,
            None if zt is None else zt.dtype)


def _cat(gm, nodes, index, ctx, n_rows) -> torch.Tensor | None:
    """The tensors at argument ``index`` of ``nodes`` stacked along N (a missing bias counts as zeros)."""
    ts = [ir.node_tensor(gm, n.args[index], ctx.params) for n in nodes]
    if all(t is None for t in ts):
        return None
    like = next(t for t in ts if t is not None)
    ts = [t if t is not None else like.new_zeros((rows, *like.shape[1:])) for t, rows in zip(ts, n_rows, strict=True)]
    return torch.cat([t.detach() for t in ts], 0).contiguous()


def _fuse_group(gm, nodes, ctx, mode) -> None:
    first, wq = nodes[0], qops.wq_linear_op()
    x, *_, fmt, group = first.args[:7]
    act = first.args[7] if len(first.args) > 7 else "none"
    tag = ir.sublayer(first)
    rows = [ir.node_tensor(gm, n.args[1], ctx.params).shape[0] for n in nodes]
    base = f"_ec_fused_{first.name}"
    q, s, z, b = (ir.add_buffer(gm, first, f"{base}_{what}", _cat(gm, nodes, i, ctx, rows), tag, mode)
                  for what, i in (("qweight", 1), ("scales", 2), ("zeros", 3), ("bias", 4)))
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(wq, (x, q, s, z, b, fmt, group, act))
    fused.meta[ir.TAG] = tag
    start = 0
    for node, n in zip(nodes, rows, strict=True):
        with gm.graph.inserting_before(node):
            part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, start + n))
        part.meta[ir.TAG] = tag
        node.replace_all_uses_with(part)
        gm.graph.erase_node(node)
        start += n


@register_pass(FuseParallelLinears, phase="fuse", invalidates=())
def fuse_parallel_linears(gm: fx.GraphModule, cfg: FuseParallelLinears, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    wq = qops.wq_linear_op()
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    alone: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is wq:
            key = _key(gm, node, ctx)
            if isinstance(key, str):
                alone[str(ir.sublayer(node) or node.name)] = key
            else:
                groups[key].append(node)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return PassResult(modified=False, note="; ".join(f"{k} not fused: {v}" for k, v in alone.items()))
    saved, buffers = ir.copy_graph_module(gm).graph, set(gm._buffers)  # meta shared, not deep-copied
    old_attrs = [a for nodes in groups.values() for n in nodes for a in n.args[1:5]]
    mode = ir.fake_mode_for(gm, ctx.example_inputs)
    where = []
    for nodes in groups.values():
        _fuse_group(gm, nodes, ctx, mode)
        where.append(f"{ir.sublayer(nodes[0])}: {len(nodes)} linears")
    gm.recompile()
    try:  # fresh metadata (the slices are strided views); a consumer that cannot take one fails here
        ir.propagate_meta(gm, ctx.example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure means: keep the graph as it was
        gm.graph = saved
        for name in set(gm._buffers) - buffers:
            del gm._buffers[name]
        gm.recompile()
        return PassResult(modified=False, note=f"not fused: shape propagation failed on the sliced outputs ({e})")
    ir.drop_unused_attrs(gm, old_attrs)
    return PassResult(modified=True, count=len(where), where=where,
                      note="; ".join(f"{k} not fused: {v}" for k, v in alone.items()))
