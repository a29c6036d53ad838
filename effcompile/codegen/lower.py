"""Entry point of codegen: partition a graph, generate and load kernels, rewrite the graph to call them."""

from __future__ import annotations

import heapq
import logging
import operator
import os
import types
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import cache_write as _cache_write
from effcompile.codegen.kernels import decode_attention as _decode_attention
from effcompile.codegen.kernels import dequant_matmul as _dequant
from effcompile.codegen.kernels import sparse_gemv as _sparse
from effcompile.codegen.lower_common import SYMBOL_BOUNDS, KernelRecord, static_rows
from effcompile.codegen.lower_cpu import CPU_PACKED, lower_cpu_bags
from effcompile.codegen.partition import group_tag, partition
from effcompile.codegen.triton_gen import generate
from effcompile.compiler import sparse_linear as _sl
from effcompile.compiler.cache_ops import kv_cache_write_op, rope_kv_cache_write_op
from effcompile.compiler.ir import (
    TAG,
    VAL,
    attr_tensor,
    tensor_val,
)
from effcompile.compiler.ops import wq_linear_op
from effcompile.compiler.sparse_linear import sparse_linear_op

log = logging.getLogger(__name__)


@dataclass
class LoweringResult:
    kernels: list[KernelRecord] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)


CPU_UNFUSED = ("left as torch ops: CPU without Triton, where a kernel would only wrap the same ops in a "
               "custom-op call (use_triton=True or TRITON_INTERPRET=1 generates them)")


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
    gm: fx.GraphModule, kernel_dir: str | os.PathLike, *, use_triton: bool | None = None,
    symbol_bounds: dict | None = None, shared: dict | None = None,
) -> LoweringResult:
    """Fuse row-wise op groups of gm into generated Triton custom ops, rewriting gm in place.

    use_triton: None = decide per call (CUDA tensors or TRITON_INTERPRET=1 -> Triton, else eager
    reference); True = always the Triton kernel (interpreted on CPU); False = always the reference.
    symbol_bounds: {sympy symbol: largest size} of the shape bucket this graph is compiled for, so a kernel choice
    that depends on the row count can use a bound where the graph's sizes are symbolic (lower_common.max_rows).
    shared: the compiled model's PassContext.shared, so its graphs share one packed copy of each weight (ir.shared_tensors).
    """
    mode = _mode(use_triton)
    token = SYMBOL_BOUNDS.set(dict(symbol_bounds or {}))
    try:
        return _lower(gm, kernel_dir, mode, shared)
    finally:
        SYMBOL_BOUNDS.reset(token)


def _lower(gm: fx.GraphModule, kernel_dir: str | os.PathLike, mode: int, shared: dict | None) -> LoweringResult:
    bags, bag_fallbacks = lower_cpu_bags(gm, mode, shared)
    eora_fallbacks = _fuse_eora_side_paths(gm, mode)  # after the bags: only wq_linear left for Triton
    # Splitting a linear's bias into its consumer's kernel only pays when that kernel is Triton: on the
    # torch path it turns one addmm into a matmul plus a separate add (measured 7-13 % on MiniLM, CPU).
    torch_on_cpu = _torch_on_cpu(gm, mode)
    cache_writes, cache_fallbacks = _lower_cache_writes(gm, mode, torch_on_cpu)
    retargeted = (bags + _lower_quantized_linears(gm, mode) + _lower_sparse_linears(gm, mode) + cache_writes
                  + _lower_decode_attention(gm, mode))
    part = partition(gm, epilogues=not torch_on_cpu)
    result = LoweringResult(kernels=retargeted,
                            fallbacks=bag_fallbacks + eora_fallbacks + cache_fallbacks + list(part.fallbacks))
    if torch_on_cpu and mode == _ops.MODE_AUTO and part.groups:
        # No Triton will run: a generated kernel would run the same torch ops behind a custom-op call,
        # 30-90 us of dispatch each (5 ms of a 40 ms llama-base decode step), so the groups stay as they
        # are. use_triton=False still generates them (the reference path, for checking the lowering).
        result.fallbacks.append((f"{len(part.groups)} row-op group(s)", CPU_UNFUSED))
        part.groups = []
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
    for n in reversed(part.rotate_half_parts):  # consumers first; kept where their cat stayed eager
        if not n.users:
            graph.erase_node(n)
    _stable_toposort(graph)
    graph.lint()
    gm.recompile()
    return result


def _torch_on_cpu(gm: fx.GraphModule, mode: int) -> bool:
    """Whether every generated kernel of gm will run its torch path: CPU tensors, Triton neither forced
    nor interpreted (TRITON_INTERPRET=1 at lowering time)."""
    if mode == _ops.MODE_TRITON or _ops.env_interpret():
        return False
    devices = {v.device.type for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")
               if (v := tensor_val(n)) is not None}
    return devices == {"cpu"}


def _retarget(gm: fx.GraphModule, ir_op, kernel, describe) -> list[KernelRecord]:
    """Point each ``ir_op`` node at ``kernel``'s custom op; ``describe(node)`` rewrites the node's
    arguments for the kernel op and returns (kind, ops) for its KernelRecord."""
    records = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not ir_op:
            continue
        kind, ops = describe(node)  # reads the IR op's arguments (its epilogue, sparse_linear.linear_epilogue)
        node.target = _ops.op_for(kernel.NAME)
        tag = node.meta.get(TAG)
        records.append(KernelRecord(kernel.NAME, f"torch.ops.effcompile.{kernel.NAME}.default", kernel.__file__,
                                    kind, ops, (node.name,), (str(tag),) if tag is not None else ()))
    return records


def _lower_quantized_linears(gm: fx.GraphModule, mode: int) -> list[KernelRecord]:
    """effcompile::wq_linear -> the fused dequant-matmul kernel (same arguments + act + mode)."""
    def describe(node):
        act = node.args[7] if len(node.args) > 7 else node.kwargs.get("act", "none")
        epilogue = _sl.linear_epilogue(node)
        lora = node.meta.pop(_EORA, ())  # (A, B) get_attr nodes when _fuse_eora_side_paths folded them in
        node.args, node.kwargs = (*node.args[:7], act, mode, *lora), {}
        if epilogue != "none":  # the kernel op takes it after the (absent) low-rank factors
            node.args = (*node.args[:9], *(lora or (None, None)), epilogue)
        x, fmt, group = node.args[0], node.args[5], node.args[6]
        label = fmt + (f"g{group}" if group else "") + (f"-a{act}" if act != "none" else "")
        if lora:
            label += f"+eora-r{attr_tensor(gm, lora[0]).shape[0]}"
        if epilogue != "none":
            label += f"+{epilogue}"
        return node.meta.pop(CPU_PACKED, None) or _dequant.kind_for(static_rows(x), fmt, act), ("wq_linear", label)
    return _retarget(gm, wq_linear_op(), _dequant, describe)


_EORA = "ec_eora"  # node.meta key: the (A, B) get_attr nodes a wq_linear node takes over
_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)


def _plain_linear(node) -> tuple | None:
    """(input, weight) of a bias-free linear node used by exactly one node, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _LINEARS):
        return None
    args = list(node.args) + [node.kwargs.get("bias")] * (len(node.args) < 3)
    if len(args) != 3 or args[2] is not None or set(node.kwargs) - {"bias"} or len(node.users) != 1:
        return None
    return args[0], args[1]


def _eora_site(gm: fx.GraphModule, add) -> tuple | None:
    """(q, ax, bax, A node, B node) when ``add`` is passes/eora.py's ``wq_linear(x, ...) + linear(linear(x,
    A), B)``: the same x, A [r, K] and B [N, r] buffers in x's dtype, and every intermediate read only by
    the next step (so erasing the side path changes nothing else). None for anything else."""
    if add.op != "call_function" or add.target not in (operator.add, torch.add) or add.kwargs or len(add.args) != 2:
        return None
    for q, bax in (add.args, add.args[::-1]):  # noqa: B007 - both are read after the break
        if isinstance(q, fx.Node) and q.op == "call_function" and q.target is wq_linear_op() and len(q.users) == 1:
            break
    else:
        return None
    outer = _plain_linear(bax)
    inner = _plain_linear(outer[0]) if outer else None
    if inner is None or inner[0] is not q.args[0]:
        return None
    a, b, q_weight = attr_tensor(gm, inner[1]), attr_tensor(gm, outer[1]), attr_tensor(gm, q.args[1])
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (a, b, q_weight)):
        return None
    xval = tensor_val(q.args[0])
    k = xval.shape[-1] if xval is not None else a.shape[1]
    dtype = xval.dtype if xval is not None else a.dtype
    if a.shape[1] != k or b.shape != (q_weight.shape[0], a.shape[0]) or not a.dtype == b.dtype == dtype:
        return None
    return q, outer[0], bax, inner[1], outer[1]


def _fuse_eora_side_paths(gm: fx.GraphModule, mode: int) -> list[tuple[str, str]]:
    """EoRA (passes/eora.py): fold ``wq_linear(x) + B(A x)`` into the wq_linear node, which
    _lower_quantized_linears then points at the dequant kernel with A, B as its lora_a / lora_b: the kernel
    adds (x A^T) B^T to its accumulator, saving the side path's output write, re-read and add.

    Only when the graph lowers for Triton. On CPU without Triton, weight-only int8/int4 wq_linear went to
    the bag GEMV (lower_cpu.lower_cpu_bags, which has no low-rank term) and the rest run torch paths where fusing
    saves nothing: the side path stays two torch linears + an add. Pairings the kernel cannot take
    (W8A8, formats without a Triton kernel) also keep it; those are reported as fallbacks."""
    if mode == _ops.MODE_TORCH or _torch_on_cpu(gm, mode):
        return []
    fallbacks = []
    for add in list(gm.graph.nodes):
        site = _eora_site(gm, add)
        if site is None:
            continue
        q, ax, bax, a, b = site
        fmt, act = q.args[5], q.args[7] if len(q.args) > 7 else q.kwargs.get("act", "none")
        why = _dequant.format_unsupported(fmt, act) or _dequant.lora_unfusable(fmt, act)
        if why:
            fallbacks.append((add.name, f"EoRA side path not fused into {q.name}: {why}"))
            continue
        for attr in (a, b):  # eora.py inserted them after q; the fused call reads them
            if attr.op == "get_attr":
                q.prepend(attr)
        q.meta[_EORA] = (a, b)
        add.replace_all_uses_with(q)
        for n in (add, bax, ax):
            gm.graph.erase_node(n)
    return fallbacks


def _lower_sparse_linears(gm: fx.GraphModule, mode: int) -> list[KernelRecord]:
    """effcompile::sparse_linear -> the sparse GEMV kernel (same arguments + mode)."""
    def describe(node):
        epilogue = _sl.linear_epilogue(node)
        node.args, node.kwargs = (*node.args[:10], mode, epilogue), {}
        x, fmt, group = node.args[0], node.args[6], node.args[7]
        label = fmt + (f"g{group}" if group else "") + (f"+{epilogue}" if epilogue != "none" else "")
        return _sparse.kind_for(static_rows(x), fmt), ("sparse_linear", label)
    return _retarget(gm, sparse_linear_op(), _sparse, describe)


def _lower_cache_writes(gm: fx.GraphModule, mode: int, torch_on_cpu: bool) -> tuple[list, list]:
    """effcompile::kv_cache_write -> the one-kernel cache update (same arguments + mode); with no Triton to
    run on CPU, back to the torch ops it stands for, since the op would only add a custom-op call to them
    (~45 us a layer, measured on this project's CPU machine). Returns (kernel records, fallbacks)."""
    if torch_on_cpu and mode == _ops.MODE_AUTO:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is kv_cache_write_op()]
        for node in nodes:
            _inline_cache_write(gm.graph, node)
        return [], [(f"{len(nodes)} K/V cache write(s)", CPU_UNFUSED)] if nodes else []

    def describe(node):
        node.args = (*node.args, mode)
        return "cache-write", ("kv_cache_write", "counter" if node.args[5] is not None else "positions")

    def describe_rope(node):  # passes/fuse_rope_cache_write.py fires only where Triton runs
        node.args = (*node.args, mode)
        return "cache-write", ("rope_kv_cache_write", "counter" if node.args[7] is not None else "positions")
    rope_kernel = types.SimpleNamespace(NAME=_cache_write.ROPE_NAME, __file__=_cache_write.__file__)
    return (_retarget(gm, kv_cache_write_op(), _cache_write, describe)
            + _retarget(gm, rope_kv_cache_write_op(), rope_kernel, describe_rope)), []


def _lower_decode_attention(gm: fx.GraphModule, mode: int) -> list[KernelRecord]:
    """effcompile::decode_gqa_attention (GroupedQueryAttention(decode_kernel=True)) -> the decode attention
    kernels (same arguments + mode), which run SDPA for calls they do not take (more than one query token)."""
    def describe(node):
        node.args = (*node.args, mode)
        return "attention", ("decode_gqa_attention", "masked" if node.args[3] is not None else "unmasked")
    return _retarget(gm, torch.ops.effcompile.decode_gqa_attention.default, _decode_attention, describe)


def _inline_cache_write(graph: fx.Graph, node: fx.Node) -> None:
    """Replace a kv_cache_write node with the torch ops of compiler/cache_ops.kv_cache_write_eager."""
    keys, values, k, v, position, length = node.args
    with graph.inserting_before(node):
        if position is None:
            n = tensor_val(k).shape[2]
            arange = graph.call_function(torch.arange, (n,), {"device": tensor_val(length).device})
            position = graph.call_function(operator.add, (arange, length))
            graph.call_method("add_", (length, n))
        for cache, new in ((keys, k), (values, v)):
            graph.call_method("index_copy_", (cache, 2, position, new))
    graph.erase_node(node)


def load_kernels(paths) -> list[str]:
    """Warm start: register the custom ops of existing generated files; returns their op names."""
    return [_ops.load_module(p).NAME for p in paths]
