"""Fuse: sparsify -> linear / wq_linear becomes one effcompile::sparse_linear with an input-major weight (exact).

ThresholdChannels (semantic phase) inserts ``sparsify`` before linears and Quantize (quantize phase) may
turn those linears into ``wq_linear``; this default pass then merges each pair, re-laying the weight out
input-major so a decode kernel skips the weight rows of zeroed inputs (compiler/sparse_linear.py). Its
buffers bake the weights: the thresholding pass that inserted the sparsify puts a weight hash in the
cache key (reads_weights), so a cached entry never outlives the weights it was built from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from effcompile.compiler import ir, sparse_ops
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class FuseSparseLinear(PassConfig):
    """Merge ``sparsify`` into the linear it feeds (float, int8 or int4 weights); part of the default pipeline."""


def _plan(gm, node, ctx, triton: bool) -> tuple[tuple, str] | str:
    """((weight, scales, zeros, bias node, fmt, group), why) for a linear fed by sparsify, or why not."""
    if ir.target_name(node) == "linear":
        args = list(node.args) + [None] * (3 - len(node.args))
        w = ir.node_tensor(gm, args[1] if args[1] is not None else node.kwargs.get("weight"), ctx.params)
        if w is None or w.dim() != 2 or w.dtype not in qops.FLOAT_DTYPES:
            return "weight is not a 2-D float parameter of the model"
        b = args[2] if args[2] is not None else node.kwargs.get("bias")
        return (w, None, None, b, "float", 0), ""
    _, q, s, z, b, fmt, group = node.args[:7]
    act = node.args[7] if len(node.args) > 7 else "none"
    if act != "none":
        return f"activations={act!r} are quantized too: the sparse kernel takes float activations"
    q, s, z = (ir.node_tensor(gm, t, ctx.params) for t in (q, s, z))
    if q is None or s is None or fmt not in sl.FORMATS:
        return f"quantized weight ({fmt}) is not a buffer this pass can re-lay out"
    val = ir.tensor_val(node.args[0])
    if fmt == "int4" and not triton and q.device.type == "cpu" and val is not None \
            and qops.packed_cpu_unavailable(fmt, val.dtype, q.shape[0]) is None and (why := sl.cpu_int4_kernel_unavailable()):
        # Without codegen's C kernel (cpu_int4_gemv: no C compiler here), torch's packed int4 matmul over every
        # row beat the row-skipping 4-bit bag GEMV at 50 % sparsity, 1.9-4.1x (session 17, dev box, 2048x768 to
        # 8192x2048, 1 and 8 rows; fp32 on x rounded to bf16, ops.BF16_ACTIVATIONS). Where Triton runs (a GPU,
        # the interpreter) the sparse kernel takes it.
        rounded = " (x rounded to bf16 for it)" if ("int4", val.dtype) in qops.BF16_ACTIVATIONS else ""
        return (f"int4 with {val.dtype} activations on the CPU: torch's packed int4 matmul of the thresholded input"
                f"{rounded} beats skipping rows in the 4-bit bag ({why})")
    if fmt == "int4" and q.shape[0] % 2:
        return f"int4 with odd out_features={q.shape[0]} cannot pack two outputs per byte"
    return (q, s, z, b, fmt, group), ""


@register_pass(FuseSparseLinear, phase="fuse", invalidates=())
def fuse_sparse_linear(gm: fx.GraphModule, cfg: FuseSparseLinear, ctx: PassContext) -> PassResult:
    sparsify, wq = sparse_ops.sparsify_op(), qops.wq_linear_op()
    triton = ir.triton_runs(gm, ctx.example_inputs, ctx.params)
    mode = None
    where, kept = [], {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not (node.target is wq or ir.target_name(node) == "linear"):
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is sparsify):
            continue
        tag = ir.sublayer(node)
        label = str(src.args[2])
        plan = _plan(gm, node, ctx, triton)
        if isinstance(plan, str):
            kept[label] = plan
            continue
        (w, s, z, b, fmt, group), _ = plan
        # once for all of the model's graphs while one holds it (ir.shared_tensors)
        key = (fmt, group, *(None if t is None else ir.tensor_key(t) for t in (w, s, z)))
        wt, st, zt = ir.shared_tensors(ctx.shared, "fuse_sparse_linear.input_major", key,
                                       lambda w=w, s=s, z=z, fmt=fmt, group=group: sl.to_input_major(w, s, z, fmt, group),
                                       hold=(w, s, z))
        mode = mode or ir.fake_mode_for(gm, ctx.example_inputs)
        base = f"_ec_sp_{node.name}"
        wt_n = ir.add_buffer(gm, node, f"{base}_weight_t", wt, tag, mode)
        st_n = ir.add_buffer(gm, node, f"{base}_scales", st, tag, mode)
        zt_n = ir.add_buffer(gm, node, f"{base}_zeros", zt, tag, mode)
        x, thr, _, decode_only = src.args
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(sl.sparse_linear_op(),
                                         (x, thr, wt_n, st_n, zt_n, b, fmt, group, label, decode_only))
        new.meta.update({k: v for k, v in node.meta.items() if k in (ir.VAL, ir.TAG, "nn_module_stack")})
        old_attrs = node.args[1:4] if node.target is wq else ()
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not src.users:
            gm.graph.erase_node(src)
        ir.drop_unused_attrs(gm, old_attrs)
        where.append(str(tag) if tag is not None else node.name)
    merged = _merge_sparsify(gm, ctx)
    if where or merged:
        gm.recompile()
    note = "; ".join(f"{k} not fused: {v}" for k, v in kept.items())
    if merged:
        note = "; ".join([note] * bool(note) + [f"{merged} sparsify op(s) merged into one of the same input and "
                                                   "thresholds, so FuseParallelLinears can fuse the linears they feed"])
    return PassResult(modified=bool(where or merged), count=len(where), where=where,
                      artifacts={"unfused": kept} if kept else {}, note=note)


def _merge_sparsify(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Sparsify ops left unfused that read one input with equal thresholds (q / k / v, gate / up under
    per-tensor thresholds) become the first of them, labelled for all ("q+k+v", as FuseParallelLinears labels
    fused sparse linears): the linears then share an input and FuseParallelLinears fuses them. Returns how many
    went."""
    sparsify, groups = sparse_ops.sparsify_op(), {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is sparsify and not node.kwargs:
            x, thr, _, decode_only = node.args
            t = ir.node_tensor(gm, thr, ctx.params)
            if t is not None:
                groups.setdefault((x, decode_only, str(ir.sublayer(node)), ir.value_key(t)), []).append(node)
    gone = []
    for nodes in groups.values():
        if len(nodes) > 1:
            first = nodes[0]  # the earliest in the graph: it comes before every user of the others
            first.args = (*first.args[:2], sparse_ops.fused_label(str(n.args[2]) for n in nodes), first.args[3])
            for node in nodes[1:]:
                node.replace_all_uses_with(first)
                gone.append(node.args[1])
                gm.graph.erase_node(node)
    ir.drop_unused_attrs(gm, gone)
    return len(gone)
