"""Fuse: quantized or sparse linears reading the same input (Q/K/V, gate/up) become one, then slices (exact).

At decode a layer is a chain of small kernels; each costs a launch and a pipeline drain whatever it reads,
and a Llama-3.2-1B k/v projection (512 x 2048 int4, 0.5 MB) is too small to reach HBM speed alone. Linears
that share their input, weight format, group size, activation mode and sublayer are concatenated along N
once (packed codes, scales and zeros are row-major, so rows stack) and run as one kernel; each original
output is a slice (a view) of the fused one. Part of the default pipeline, after FuseSparseLinear.

Sparse linears (FuseSparseLinear's thresholded GEMVs) fuse the same way when they also share their
threshold tensor's values (Q/K/V under the default per-tensor thresholds: the same input, the same
quantile): the kernel's skip decision per input channel is then the same for all of them. Their weights
are input-major, so they stack along dim 1 (int4 scales and zeros too), and the fused op's label names
every part ("a+b+c"), under which sparse_ops records each part's achieved sparsity as before.

Dense float linears are left alone: their weights are the model's parameters, and a concatenated copy would
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

from effcompile.compiler import ir, sparse_ops
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
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


def _sparse_key(gm, node, ctx) -> tuple | str:
    """What must match for two sparse_linears to fuse (the threshold's values included), or why not."""
    if node.kwargs or len(node.args) != 10:
        return "arguments this pass does not know"
    x, thr, wt, st, zt, b, fmt, group, _, decode_only = node.args
    tt, wtt, stt, ztt = (ir.node_tensor(gm, t, ctx.params) for t in (thr, wt, st, zt))
    if tt is None or wtt is None or (st is not None and stt is None) or (zt is not None and ztt is None):
        return "its threshold or weight is not a graph buffer"
    if b is not None and ir.node_tensor(gm, b, ctx.params) is None:
        return "its bias is not a parameter or buffer"
    return ("sparse", x, fmt, group, decode_only, str(ir.sublayer(node)), ir.value_key(tt), wtt.dtype, wtt.shape[0],
            None if stt is None else stt.dtype)


def _out_features(gm, node, ctx) -> int:
    if node.target is qops.wq_linear_op():
        return ir.node_tensor(gm, node.args[1], ctx.params).shape[0]
    wt = ir.node_tensor(gm, node.args[2], ctx.params)  # input-major [K, N]; int4 packs two outputs a byte
    return wt.shape[1] * (2 if node.args[6] == "int4" else 1)


def _cat(gm, nodes, index, ctx, n_rows, dim=0) -> torch.Tensor | None:
    """The tensors at argument ``index`` of ``nodes`` stacked along ``dim`` (a missing bias counts as zeros), once for
    all of the model's graphs while one holds it (ir.shared_tensors; its parts are FuseSparseLinear's shared copies
    or Quantize's shared weights, so the key names them however often they were made)."""
    ts = [ir.node_tensor(gm, n.args[index], ctx.params) for n in nodes]
    if all(t is None for t in ts):
        return None
    key = (dim, *(("zeros", rows) if t is None else ir.tensor_key(t) for t, rows in zip(ts, n_rows, strict=True)))

    def make():
        like = next(t for t in ts if t is not None)
        full = [t if t is not None else like.new_zeros((rows, *like.shape[1:])) for t, rows in zip(ts, n_rows, strict=True)]
        return (torch.cat([t.detach() for t in full], dim).contiguous(),)

    hold = tuple(t for t in ts if t is not None and not hasattr(t, "_ec_made_from"))
    return ir.shared_tensors(ctx.shared, "fuse_parallel_linears.cat", key, make, hold)[0]


def _fuse_group(gm, nodes, ctx, mode) -> None:
    first = nodes[0]
    tag = ir.sublayer(first)
    rows = [_out_features(gm, n, ctx) for n in nodes]
    base = f"_ec_fused_{first.name}"
    if first.target is qops.wq_linear_op():
        x, *_, fmt, group = first.args[:7]
        act = first.args[7] if len(first.args) > 7 else "none"
        q, s, z, b = (ir.add_buffer(gm, first, f"{base}_{what}", _cat(gm, nodes, i, ctx, rows), tag, mode)
                      for what, i in (("qweight", 1), ("scales", 2), ("zeros", 3), ("bias", 4)))
        op, args = qops.wq_linear_op(), (x, q, s, z, b, fmt, group, act)
    else:
        x, thr, _, _, _, _, fmt, group, _, decode_only = first.args
        # Input-major: outputs are dim 1 of the weight and of int4's [K / G, N] scales and zeros; int8's
        # scales and every bias are [N].
        dims = {2: 1, 3: 1 if fmt == "int4" else 0, 4: 1, 5: 0}
        wt, s, z, b = (ir.add_buffer(gm, first, f"{base}_{what}", _cat(gm, nodes, i, ctx, rows, dims[i]), tag, mode)
                       for what, i in (("weight_t", 2), ("scales", 3), ("zeros", 4), ("bias", 5)))
        label = sparse_ops.fused_label(str(n.args[8]) for n in nodes)
        op, args = sl.sparse_linear_op(), (x, thr, wt, s, z, b, fmt, group, label, decode_only)
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(op, args)
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
    wq, sparse = qops.wq_linear_op(), sl.sparse_linear_op()
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    alone: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (wq, sparse):
            key = _key(gm, node, ctx) if node.target is wq else _sparse_key(gm, node, ctx)
            if isinstance(key, str):
                alone[str(ir.sublayer(node) or node.name)] = key
            else:
                groups[key].append(node)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return PassResult(modified=False, note="; ".join(f"{k} not fused: {v}" for k, v in alone.items()))
    saved, buffers = ir.copy_graph_module(gm).graph, set(gm._buffers)  # meta shared, not deep-copied
    old_attrs = [a for nodes in groups.values() for n in nodes for a in n.args[1:6]]  # incl. sparse biases
    mode = ir.fake_mode_for(gm, ctx.example_inputs)
    where = []
    for nodes in groups.values():
        _fuse_group(gm, nodes, ctx, mode)
        where.append(f"{ir.sublayer(nodes[0])}: {len(nodes)} linears")
    gm.recompile()
    try:  # fresh metadata (the slices are strided views); a consumer that cannot take one fails here
        ir.refresh_meta(gm, ctx.example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure means: keep the graph as it was
        gm.graph = saved
        for name in set(gm._buffers) - buffers:
            del gm._buffers[name]
        gm.recompile()
        return PassResult(modified=False, note=f"not fused: shape propagation failed on the sliced outputs ({e})")
    ir.drop_unused_attrs(gm, old_attrs)
    return PassResult(modified=True, count=len(where), where=where,
                      note="; ".join(f"{k} not fused: {v}" for k, v in alone.items()))
