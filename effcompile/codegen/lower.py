"""Entry point of codegen: partition a graph, generate and load kernels, rewrite the graph to call them."""

from __future__ import annotations

import contextvars
import heapq
import logging
import math
import operator
import os
import types
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import cache_write as _cache_write
from effcompile.codegen.kernels import cpu_bag_gemv as _bag
from effcompile.codegen.kernels import cpu_int4_gemv as _int4_gemv
from effcompile.codegen.kernels import decode_attention as _decode_attention
from effcompile.codegen.kernels import dequant_matmul as _dequant
from effcompile.codegen.kernels import sparse_gemv as _sparse
from effcompile.codegen.partition import group_tag, partition
from effcompile.codegen.triton_gen import generate
from effcompile.compiler import ops as _qops
from effcompile.compiler import sparse_linear as _sl
from effcompile.compiler.cache_ops import kv_cache_write_op, rope_kv_cache_write_op
from effcompile.compiler.ir import (
    TAG,
    VAL,
    add_buffer,
    attr_tensor,
    drop_unused_attrs,
    fake_mode_for,
    tensor_val,
)
from effcompile.compiler.ops import wq_linear_op
from effcompile.compiler.sparse_linear import sparse_linear_op

log = logging.getLogger(__name__)
# {sympy symbol: largest size} of the shape bucket lower() is compiling for (see lower's symbol_bounds)
_SYMBOL_BOUNDS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("effcompile_symbol_bounds", default=None)


@dataclass(frozen=True)
class KernelRecord:
    name: str
    op: str  # "torch.ops.effcompile.<name>.default"
    source_path: str
    kind: str  # "pointwise" | "reduction" | "epilogue" | "dequant-gemv" | "dequant-gemm" | "cache-write" | ...
    ops: tuple[str, ...]
    nodes: tuple[str, ...]  # original node names the kernel replaced
    sublayers: tuple[str, ...]


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
    symbol_bounds: dict | None = None,
) -> LoweringResult:
    """Fuse row-wise op groups of gm into generated Triton custom ops, rewriting gm in place.

    use_triton: None = decide per call (CUDA tensors or TRITON_INTERPRET=1 -> Triton, else eager
    reference); True = always the Triton kernel (interpreted on CPU); False = always the reference.
    symbol_bounds: {sympy symbol: largest size} of the shape bucket this graph is compiled for, so a kernel choice
    that depends on the row count can use a bound where the graph's sizes are symbolic (_max_rows).
    """
    mode = _mode(use_triton)
    token = _SYMBOL_BOUNDS.set(dict(symbol_bounds or {}))
    try:
        return _lower(gm, kernel_dir, mode)
    finally:
        _SYMBOL_BOUNDS.reset(token)


def _lower(gm: fx.GraphModule, kernel_dir: str | os.PathLike, mode: int) -> LoweringResult:
    bags, bag_fallbacks = _lower_cpu_bags(gm, mode)
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


def _static_rows(x) -> int | None:
    """Rows of activations a call will have, if the graph knows it (symbolic: picked per call)."""
    val = tensor_val(x)
    static = val is not None and all(isinstance(d, int) for d in val.shape[:-1])
    return math.prod(val.shape[:-1]) if static else None


def _max_rows(x) -> int | None:
    """The most activation rows a call can have: the static count, else its symbolic sizes at the largest the
    shape bucket being compiled allows (lower's symbol_bounds); None when some size has no bound."""
    if (rows := _static_rows(x)) is not None:
        return rows
    val, bounds = tensor_val(x), _SYMBOL_BOUNDS.get()
    if val is None or not bounds:
        return None
    total = 1
    for d in val.shape[:-1]:
        if isinstance(d, int):
            total *= d
            continue
        expr = getattr(getattr(d, "node", None), "expr", None)
        hi = expr.subs(bounds) if expr is not None else None
        if hi is None or not getattr(hi, "is_Integer", False):
            return None
        total *= int(hi)
    return total


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
        return node.meta.pop(_CPU_PACKED, None) or _dequant.kind_for(_static_rows(x), fmt, act), ("wq_linear", label)
    return _retarget(gm, wq_linear_op(), _dequant, describe)


_EORA = "ec_eora"  # node.meta key: the (A, B) get_attr nodes a wq_linear node takes over
_CPU_PACKED = "ec_cpu_packed"  # node.meta key: the kind of a wq_linear that runs torch's packed CPU matmul
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
    the bag GEMV (_lower_cpu_bags, which has no low-rank term) and the rest run torch paths where fusing
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
        return _sparse.kind_for(_static_rows(x), fmt), ("sparse_linear", label)
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


def _packed_kind(gm: fx.GraphModule, node) -> str | None:
    """"cpu-int4pack-mm" / "cpu-int8pack-mm" for a weight-only int4 / int8 wq_linear whose 16-bit activations
    torch's packed CPU matmul takes (left as wq_linear, whose eager path runs it), "cpu-int4pack-mm-bf16x" for int4
    with fp32 activations rounded to bf16 for it (ops.BF16_ACTIVATIONS); None otherwise."""
    if node.op != "call_function" or node.target is not wq_linear_op() or len(node.args) < 7:
        return None
    x, q, _, _, _, fmt, _ = node.args[:7]
    act = node.args[7] if len(node.args) > 7 else node.kwargs.get("act", "none")
    qt, val = attr_tensor(gm, q), tensor_val(x)
    if act != "none" or _sl.linear_epilogue(node) not in (None, "none") or qt is None or qt.device.type != "cpu" \
            or val is None:
        return None
    if _qops.packed_cpu_unavailable(fmt, val.dtype, qt.shape[0]):
        return None
    return f"cpu-{fmt}pack-mm" + ("-bf16x" if (fmt, val.dtype) in _qops.BF16_ACTIVATIONS else "")


def _bag_plan(gm: fx.GraphModule, node) -> tuple | str | None:
    """(x, threshold, weight_t, scales, zeros, bias, fmt, group, label, decode_only) in sparse_linear's
    input-major layout for a node the CPU bag GEMV can take; a reason string if it cannot; None if the
    node is not a candidate at all."""
    if node.op != "call_function":
        return None
    if _sl.linear_epilogue(node) not in (None, "none"):
        # FuseGatedActivation fires only where Triton runs; a graph that still has an epilogue here keeps its
        # IR op, whose eager path applies it.
        return "it carries an output epilogue, which the bag GEMV has not"
    if node.target is sparse_linear_op():
        x, thr, w, s, z, b, fmt, group, label, decode_only = node.args[:10]
        wt, st, zt = attr_tensor(gm, w), attr_tensor(gm, s), attr_tensor(gm, z)
    elif node.target is wq_linear_op():
        x, q, s, z, b, fmt, group = node.args[:7]
        act = node.args[7] if len(node.args) > 7 else node.kwargs.get("act", "none")
        if act != "none" or fmt not in ("int8", "int4"):
            return None  # W8A8 / fp8 / MX keep their own kernels
        q, st, zt = attr_tensor(gm, q), attr_tensor(gm, s), attr_tensor(gm, z)
        if q is None or st is None:
            return "quantized weight is not a buffer"
        if fmt == "int4" and q.shape[0] % 2:
            return f"int4 with odd out_features={q.shape[0]}"
        wt, st, zt = _sl.to_input_major(q, st, zt, fmt, group)
        thr, label, decode_only = None, "", False
    else:
        return None
    if wt is None or wt.device.type != "cpu":
        return "weight is not a CPU buffer"
    why = _bag.unavailable(fmt)
    return why if why else (x, thr, wt, st, zt, b, fmt, group, label, decode_only)


def _lower_cpu_bags(gm: fx.GraphModule, mode: int) -> tuple[list[KernelRecord], list[tuple[str, str]]]:
    """On CPU, decode-time sparse_linear and weight-only int8/int4 wq_linear -> the embedding-bag GEMV.

    Only when the graph will not run Triton (CPU weights, not forced, no TRITON_INTERPRET): the bag
    rows are a CPU layout, and the Triton kernels (also interpreted in tests) take the original one.
    """
    if mode == _ops.MODE_TRITON or _ops.env_interpret():
        return [], []
    records, fallbacks = [], []
    fake_mode = None
    for node in list(gm.graph.nodes):
        if _int4_kernel_rows(gm, node) and isinstance(plan := _bag_plan(gm, node), tuple):
            # The C kernel beats torch's packed int4 matmul even reading every row at one activation row (a batch-1
            # decode graph) and from 8 rows on, where blocks of 4 rows share each code's conversion (Llama-3.2-1B
            # shapes and its LM head from DRAM, session 24: 1 row 1.08-1.63x, 8 rows 0.95-1.18x, 32 rows
            # 1.06-1.38x); at 2-4 rows the packed matmul is 1.0-1.2x faster and keeps 16-bit activations there.
            # fp32 activations take the kernel at every row count: the packed matmul needs them rounded to bf16,
            # and a model whose prefill and decode rounded differently would not agree with itself.
            fake_mode = fake_mode or fake_mode_for(gm)
            records.append(_lower_int4_gemv(gm, node, plan, node.meta.get(TAG), fake_mode))
            continue
        if (packed := _packed_kind(gm, node)) is not None and not _int8_kernel_rows(gm, node):
            # 16-bit activations: wq_linear's eager path runs torch's packed int4 / int8 matmul (compiler/ops.py,
            # checked against the reference), faster there than the bag (session 17, dev box, AVX512, bf16:
            # int4 3-9x at 1-8 rows, int8 1.5-3.7x. With fp32 activations they are slow: int8 4-15x slower than the
            # bag, int4 1.6 ms at one row and 220 ms at 128 for 2048x768).
            # The node stays for the dequant op, whose CPU path that is; its record names the kind.
            node.meta[_CPU_PACKED] = packed
            continue
        plan = _bag_plan(gm, node)
        if plan is None:
            continue
        if isinstance(plan, str):
            fallbacks.append((node.name, f"CPU bag GEMV not used: {plan}"))
            continue
        x, thr, wt, st, zt, b, fmt, group, label, decode_only = plan
        old = node.args[1:5]
        tag = node.meta.get(TAG)
        fake_mode = fake_mode or fake_mode_for(gm)
        if fmt == "int4" and thr is not None:
            why = _int4_gemv.unavailable()
            if why is None:  # FBGEMM's 4-bit bag converts codes too slowly to gain from skipping rows (module doc)
                records.append(_lower_int4_gemv(gm, node, plan, tag, fake_mode))
                continue
            fallbacks.append((node.name, f"{why}: the 4-bit embedding bag runs instead"))
        rows = _bag.pack(wt, fmt)
        new_args = [add_buffer(gm, node, f"_ec_bag_{node.name}_{suffix}", t, tag, fake_mode)
                    for suffix, t in (("rows", rows), ("scales", st), ("zeros", zt))]
        kind = "sparse_linear" if thr is not None else "wq_linear"
        node.target = _ops.op_for(_bag.NAME)
        node.args, node.kwargs = (x, thr, *new_args, b, fmt, group, label, decode_only), {}
        drop_unused_attrs(gm, old)  # the original layout is no longer read: do not keep (or cache) it
        records.append(KernelRecord(_bag.NAME, f"torch.ops.effcompile.{_bag.NAME}.default", _bag.__file__,
                                    _bag.kind_for(_max_rows(x), fmt, rows.dtype), (kind, fmt + (f"g{group}" if group else "")),
                                    (node.name,), (str(tag),) if tag is not None else ()))
    return records, fallbacks


def _int4_kernel_rows(gm: fx.GraphModule, node) -> bool:
    """A weight-only int4 wq_linear on CPU weights the C kernel takes: fp32 activations, or a graph calling it with 1
    or at least 8 activation rows (or a number only known per call, as prefill graphs with a dynamic length)."""
    if node.op != "call_function" or node.target is not wq_linear_op() or len(node.args) < 7 or node.args[5] != "int4":
        return False
    q, rows, val = attr_tensor(gm, node.args[1]), _static_rows(node.args[0]), tensor_val(node.args[0])
    fp32 = val is not None and val.dtype == torch.float32
    return q is not None and q.device.type == "cpu" and (fp32 or not (rows is not None and 1 < rows < 8)) \
        and _int4_gemv.unavailable() is None


def _int8_kernel_rows(gm: fx.GraphModule, node) -> bool:
    """A weight-only int8 wq_linear with 16-bit activations that the bag lowering takes instead of torch's packed int8
    matmul, for cpu_float_gemv's kernel on the byte rows: a graph calling it with 1-8 activation rows, where the
    kernel was 1.1-2.9x the packed matmul (Llama-3.2-1B shapes from DRAM, bf16, session 25); with a dynamic batch, a
    shape bucket of at most 8 rows (_max_rows). Larger or unbounded row counts keep wq_linear's eager path: past 8
    rows the bag path dequantizes the weight per call."""
    if node.op != "call_function" or node.target is not wq_linear_op() or len(node.args) < 7 or node.args[5] != "int8":
        return False
    rows = _max_rows(node.args[0])  # a dynamic batch's bucket (say 5-8 sequences of one token) counts as its largest
    return rows is not None and rows >= 1 and _bag.row_kernel("int8", torch.uint8, rows)


def _lower_int4_gemv(gm: fx.GraphModule, node, plan: tuple, tag, fake_mode) -> KernelRecord:
    """A thresholded int4 sparse_linear, or an int4 wq_linear _int4_kernel_rows picks -> the C kernel's op."""
    x, thr, wt, st, zt, b, _, group, label, decode_only = plan
    old = node.args[1:5]
    panels, sz = _int4_gemv.pack(wt, st, zt)
    new_args = [add_buffer(gm, node, f"_ec_int4_{node.name}_{suffix}", t, tag, fake_mode)
                for suffix, t in (("panels", panels), ("sz", sz))]
    node.target = _ops.op_for(_int4_gemv.NAME)
    node.args, node.kwargs = (x, thr, *new_args, b, 2 * wt.shape[1], group, label, decode_only), {}
    drop_unused_attrs(gm, old)  # the original layout is no longer read: do not keep (or cache) it
    return KernelRecord(_int4_gemv.NAME, f"torch.ops.effcompile.{_int4_gemv.NAME}.default", str(_int4_gemv.SOURCE),
                        "cpu-int4-gemv", ("wq_linear" if thr is None else "sparse_linear", f"int4g{group}"), (node.name,),
                        (str(tag),) if tag is not None else ())


def load_kernels(paths) -> list[str]:
    """Warm start: register the custom ops of existing generated files; returns their op names."""
    return [_ops.load_module(p).NAME for p in paths]
