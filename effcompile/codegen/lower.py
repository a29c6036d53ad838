"""Entry point of codegen: partition a graph, generate and load kernels, rewrite the graph to call them."""

from __future__ import annotations

import heapq
import logging
import math
import operator
import os
from dataclasses import dataclass, field

import torch.fx as fx

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import dequant_matmul as _dequant
from effcompile.codegen.kernels import sparse_gemv as _sparse
from effcompile.codegen.partition import group_tag, partition
from effcompile.codegen.triton_gen import generate
from effcompile.compiler.ir import TAG, VAL, tensor_val
from effcompile.compiler.ops import wq_linear_op
from effcompile.compiler.sparse_linear import sparse_linear_op

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelRecord:
    name: str
    op: str  # "torch.ops.effcompile.<name>.default"
    source_path: str
    kind: str  # "pointwise" | "reduction" | "epilogue" | "dequant-gemv" | "dequant-gemm"
    ops: tuple[str, ...]
    nodes: tuple[str, ...]  # original node names the kernel replaced
    sublayers: tuple[str, ...]


@dataclass
class LoweringResult:
    kernels: list[KernelRecord] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)


def _mode(use_triton: bool | None) -> int:
    return _ops.MODE_AUTO if use_triton is None else _ops.MODE_TRITON if use_triton else _ops.MODE_TORCH


def _stable_toposort(graph: fx.Graph) -> None:
    """Reorder nodes so every def precedes its uses, moving as little as possible (original order wins).

    A fused node sits where the group's last node was; a reader of an earlier group output may sit
    before it, so it has to move down. Convexity of groups guarantees an order exists.
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    indeg = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(pos[n], n.name) for n in nodes if indeg[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        n = by_name[name]
        order.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (pos[u], u.name))
    if len(order) != len(nodes):
        raise RuntimeError("codegen created a cycle while fusing (group was not convex)")
    if order == nodes:
        return
    # Placeholders keep their order (they are the signature); move the rest after them.
    cur = order[0]
    for n in order[1:]:
        cur.append(n)
        cur = n


def lower(
    gm: fx.GraphModule, kernel_dir: str | os.PathLike, *, use_triton: bool | None = None
) -> LoweringResult:
    """Fuse row-wise op groups of gm into generated Triton custom ops, rewriting gm in place.

    use_triton: None = decide per call (CUDA tensors or TRITON_INTERPRET=1 -> Triton, else eager
    reference); True = always the Triton kernel (interpreted on CPU); False = always the reference.
    """
    mode = _mode(use_triton)
    quantized = _lower_quantized_linears(gm, mode) + _lower_sparse_linears(gm, mode)
    part = partition(gm)
    result = LoweringResult(kernels=quantized, fallbacks=list(part.fallbacks))
    graph = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}  # outputs of groups already fused -> their new nodes
    for group in part.groups:
        try:
            gen = generate(group)
            path = _ops.write_source(kernel_dir, gen.name, gen.source)
            _ops.load_module(path)
            target = _ops.op_for(gen.name)
        except Exception as e:  # never silent: the group stays eager and the reason is reported
            log.warning("effcompile codegen: kernel for %s failed: %s", group.nodes[-1].name, e)
            result.fallbacks += [(n.name, f"kernel generation failed: {e}") for n in group.nodes]
            continue
        tag = group_tag(group)
        names = tuple(n.name for n in group.nodes)
        with graph.inserting_after(group.nodes[-1]):
            fused = graph.call_function(target, (*(replaced.get(i, i) for i in gen.inputs), mode))
        fused.meta[TAG] = tag
        outs = list(gen.outputs)
        if len(outs) == 1:
            fused.meta[VAL] = outs[0].meta.get(VAL)
            outs[0].replace_all_uses_with(fused)
            replaced[outs[0]] = fused
        else:
            fused.meta[VAL] = tuple(o.meta.get(VAL) for o in outs)
            prev = fused
            for i, o in enumerate(outs):
                with graph.inserting_after(prev):
                    item = graph.call_function(operator.getitem, (fused, i))
                item.meta[VAL] = o.meta.get(VAL)
                item.meta[TAG] = tag
                o.replace_all_uses_with(item)
                replaced[o] = item
                prev = item
        for n in reversed(group.nodes):
            graph.erase_node(n)
        sublayers = tuple(sorted({str(n.meta[TAG]) for n in group.nodes if TAG in n.meta}))
        result.kernels.append(
            KernelRecord(
                gen.name,
                f"torch.ops.effcompile.{gen.name}.default",
                str(path),
                gen.kind,
                gen.ops,
                names,
                sublayers,
            )
        )
    _stable_toposort(graph)
    graph.lint()
    gm.recompile()
    return result


def _static_rows(x) -> int | None:
    """Rows of activations a call will have, if the graph knows it (symbolic: picked per call)."""
    val = tensor_val(x)
    static = val is not None and all(isinstance(d, int) for d in val.shape[:-1])
    return math.prod(val.shape[:-1]) if static else None


def _retarget(gm: fx.GraphModule, ir_op, kernel, describe) -> list[KernelRecord]:
    """Point each ``ir_op`` node at ``kernel``'s custom op; ``describe(node)`` rewrites the node's
    arguments for the kernel op and returns (kind, ops) for its KernelRecord."""
    records = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not ir_op:
            continue
        node.target = _ops.op_for(kernel.NAME)
        kind, ops = describe(node)
        tag = node.meta.get(TAG)
        records.append(KernelRecord(kernel.NAME, f"torch.ops.effcompile.{kernel.NAME}.default", kernel.__file__,
                                    kind, ops, (node.name,), (str(tag),) if tag is not None else ()))
    return records


def _lower_quantized_linears(gm: fx.GraphModule, mode: int) -> list[KernelRecord]:
    """effcompile::wq_linear -> the fused dequant-matmul kernel (same arguments + act + mode)."""
    def describe(node):
        act = node.args[7] if len(node.args) > 7 else node.kwargs.get("act", "none")
        node.args, node.kwargs = (*node.args[:7], act, mode), {}
        x, fmt, group = node.args[0], node.args[5], node.args[6]
        label = fmt + (f"g{group}" if group else "") + (f"-a{act}" if act != "none" else "")
        return _dequant.kind_for(_static_rows(x), fmt, act), ("wq_linear", label)
    return _retarget(gm, wq_linear_op(), _dequant, describe)


def _lower_sparse_linears(gm: fx.GraphModule, mode: int) -> list[KernelRecord]:
    """effcompile::sparse_linear -> the sparse GEMV kernel (same arguments + mode)."""
    def describe(node):
        node.args = (*node.args, mode)
        x, fmt, group = node.args[0], node.args[6], node.args[7]
        return _sparse.kind_for(_static_rows(x)), ("sparse_linear", fmt + (f"g{group}" if group else ""))
    return _retarget(gm, sparse_linear_op(), _sparse, describe)


def load_kernels(paths) -> list[str]:
    """Warm start: register the custom ops of existing generated files; returns their op names."""
    return [_ops.load_module(p).NAME for p in paths]
