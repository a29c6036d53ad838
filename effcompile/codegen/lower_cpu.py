"""CPU lowering rules: which quantized / sparse linears run codegen's C kernels, the embedding-bag GEMV, or torch's
packed matmuls (their eager path), decided per graph from the weights, the activations' dtype and the row count."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import cpu_bag_gemv as _bag
from effcompile.codegen.kernels import cpu_int4_gemv as _int4_gemv
from effcompile.codegen.lower_common import KernelRecord, max_rows
from effcompile.compiler import ops as _qops
from effcompile.compiler import sparse_linear as _sl
from effcompile.compiler.ir import (
    TAG,
    add_buffer,
    attr_tensor,
    drop_unused_attrs,
    fake_mode_for,
    shared_tensors,
    tensor_key,
    tensor_val,
)
from effcompile.compiler.ops import wq_linear_op
from effcompile.compiler.sparse_linear import sparse_linear_op

CPU_PACKED = "ec_cpu_packed"  # node.meta key: the kind of a wq_linear that runs torch's packed CPU matmul


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


class _BagPlan(NamedTuple):
    """A linear the CPU bag GEMV or the int4 C kernel can take. ``layout()``: its (weight, scales, zeros) in
    sparse_linear's input-major layout, made only when a packed copy is (a wq_linear's re-layout of its quantized
    weight took 15 s of a profiled llama-1b int4 cold compile, once per graph, though all four share one packed copy);
    ``sources``: what the layout is made from, the key of the packed copies."""

    x: object
    thr: object
    bias: object
    fmt: str
    group: int
    label: str
    decode_only: bool
    out_features: int
    sources: tuple
    layout: Callable[[], tuple]


def _bag_plan(gm: fx.GraphModule, node) -> _BagPlan | str | None:
    """The plan for a node the CPU bag GEMV can take; a reason string if it cannot; None if the node is not a
    candidate at all."""
    if node.op != "call_function":
        return None
    if _sl.linear_epilogue(node) not in (None, "none"):
        # FuseGatedActivation fires only where Triton runs; a graph that still has an epilogue here keeps its
        # IR op, whose eager path applies it.
        return "it carries an output epilogue, which the bag GEMV has not"
    if node.target is sparse_linear_op():
        x, thr, w, s, z, b, fmt, group, label, decode_only = node.args[:10]
        wt, st, zt = attr_tensor(gm, w), attr_tensor(gm, s), attr_tensor(gm, z)
        if wt is None or wt.device.type != "cpu":
            return "weight is not a CPU buffer"
        sources, out_features = (wt, st, zt), wt.shape[1] * (2 if fmt == "int4" else 1)

        def layout(wt=wt, st=st, zt=zt):
            return wt, st, zt
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
        if q.device.type != "cpu":
            return "weight is not a CPU buffer"
        sources, out_features = (q, st, zt, "input-major", group), q.shape[0]
        thr, label, decode_only = None, "", False

        def layout(q=q, st=st, zt=zt, fmt=fmt, group=group):
            return _sl.to_input_major(q, st, zt, fmt, group)
    else:
        return None
    why = _bag.unavailable(fmt)
    return why if why else _BagPlan(x, thr, b, fmt, group, label, decode_only, out_features, sources, layout)


def _made_once(shared: dict | None, space: str, sources: tuple, make) -> tuple:
    """make()'s tensors, once for all of a compiled model's graphs (``shared``: its PassContext.shared; None: made
    here), keyed by the tensors they are made from. Those made by a pass's shared_tensors are named by how they were
    made; any other is held while the entry lives, so its id cannot come back as another tensor's."""
    if shared is None:
        return tuple(make())
    key = tuple(tensor_key(t) if isinstance(t, torch.Tensor) else t for t in sources)
    hold = tuple(t for t in sources if isinstance(t, torch.Tensor) and not hasattr(t, "_ec_made_from"))
    return shared_tensors(shared, space, key, make, hold)


def lower_cpu_bags(gm: fx.GraphModule, mode: int,
                   shared: dict | None = None) -> tuple[list[KernelRecord], list[tuple[str, str]]]:
    """On CPU, decode-time sparse_linear and weight-only int8/int4 wq_linear -> the embedding-bag GEMV.

    Only when the graph will not run Triton (CPU weights, not forced, no TRITON_INTERPRET): the bag
    rows are a CPU layout, and the Triton kernels (also interpreted in tests) take the original one.
    shared: the compiled model's PassContext.shared; prefill and decode graphs then share the packed copies.
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
            records.append(_lower_int4_gemv(gm, node, plan, node.meta.get(TAG), fake_mode, shared))
            continue
        if (packed := _packed_kind(gm, node)) is not None and not _int8_kernel_rows(gm, node):
            # 16-bit activations: wq_linear's eager path runs torch's packed int4 / int8 matmul (compiler/ops.py,
            # checked against the reference), faster there than the bag (session 17, dev box, AVX512, bf16:
            # int4 3-9x at 1-8 rows, int8 1.5-3.7x. With fp32 activations they are slow: int8 4-15x slower than the
            # bag, int4 1.6 ms at one row and 220 ms at 128 for 2048x768).
            # The node stays for the dequant op, whose CPU path that is; its record names the kind.
            node.meta[CPU_PACKED] = packed
            continue
        plan = _bag_plan(gm, node)
        if plan is None:
            continue
        if isinstance(plan, str):
            fallbacks.append((node.name, f"CPU bag GEMV not used: {plan}"))
            continue
        old = node.args[1:5]
        tag = node.meta.get(TAG)
        fake_mode = fake_mode or fake_mode_for(gm)
        fmt, thr = plan.fmt, plan.thr
        if fmt == "int4" and thr is not None:
            why = _int4_gemv.unavailable()
            if why is None:  # FBGEMM's 4-bit bag converts codes too slowly to gain from skipping rows (module doc)
                records.append(_lower_int4_gemv(gm, node, plan, tag, fake_mode, shared))
                continue
            fallbacks.append((node.name, f"{why}: the 4-bit embedding bag runs instead"))

        def make(plan=plan):
            wt, st, zt = plan.layout()
            return _bag.pack(wt, plan.fmt), st, zt
        rows, st, zt = _made_once(shared, "cpu_bag_rows", (*plan.sources, fmt), make)
        new_args = [add_buffer(gm, node, f"_ec_bag_{node.name}_{suffix}", t, tag, fake_mode)
                    for suffix, t in (("rows", rows), ("scales", st), ("zeros", zt))]
        kind = "sparse_linear" if thr is not None else "wq_linear"
        node.target = _ops.op_for(_bag.NAME)
        node.args, node.kwargs = (plan.x, thr, *new_args, plan.bias, fmt, plan.group, plan.label, plan.decode_only), {}
        drop_unused_attrs(gm, old)  # the original layout is no longer read: do not keep (or cache) it
        records.append(KernelRecord(_bag.NAME, f"torch.ops.effcompile.{_bag.NAME}.default", _bag.__file__,
                                    _bag.kind_for(max_rows(plan.x), fmt, rows.dtype),
                                    (kind, fmt + (f"g{plan.group}" if plan.group else "")),
                                    (node.name,), (str(tag),) if tag is not None else ()))
    return records, fallbacks


def _int4_kernel_rows(gm: fx.GraphModule, node) -> bool:
    """A weight-only int4 wq_linear on CPU weights the C kernel takes: fp32 activations, or a graph calling it with 1
    or at least 8 activation rows. A dynamic row count counts as the largest of the shape bucket being compiled
    (max_rows: a batch of 3-4 sequences takes the packed matmul, as a static 3 or 4 does), or as many rows when it
    has no bound (prefill graphs with a dynamic length)."""
    if node.op != "call_function" or node.target is not wq_linear_op() or len(node.args) < 7 or node.args[5] != "int4":
        return False
    q, rows, val = attr_tensor(gm, node.args[1]), max_rows(node.args[0]), tensor_val(node.args[0])
    fp32 = val is not None and val.dtype == torch.float32
    return q is not None and q.device.type == "cpu" and (fp32 or not (rows is not None and 1 < rows < 8)) \
        and _int4_gemv.unavailable() is None


def _int8_kernel_rows(gm: fx.GraphModule, node) -> bool:
    """A weight-only int8 wq_linear with 16-bit activations that the bag lowering takes instead of torch's packed int8
    matmul, for cpu_float_gemv's kernel on the byte rows: a graph calling it with 1-8 activation rows, where the
    kernel was 1.1-2.9x the packed matmul (Llama-3.2-1B shapes from DRAM, bf16, session 25); with a dynamic batch, a
    shape bucket of at most 8 rows (max_rows). Larger or unbounded row counts keep wq_linear's eager path: past 8
    rows the bag path dequantizes the weight per call."""
    if node.op != "call_function" or node.target is not wq_linear_op() or len(node.args) < 7 or node.args[5] != "int8":
        return False
    rows = max_rows(node.args[0])  # a dynamic batch's bucket (say 5-8 sequences of one token) counts as its largest
    return rows is not None and rows >= 1 and _bag.row_kernel("int8", torch.uint8, rows)


def cached_kernels_unusable(kinds) -> str | None:
    """Why a cached graph whose kernels have these kinds should be rebuilt here rather than run, or None. Its int4
    linears on the C kernel hold only the kernel's panel layout, and where the kernel cannot build (no C compiler
    on this machine) their fallback dequantizes every weight on every call (~200 ms a call on Llama-3.2-1B's
    gate_up); a graph lowered here keeps torch's packed int4 matmul instead."""
    if "cpu-int4-gemv" in set(kinds) and (why := _int4_gemv.unavailable()) is not None:
        return f"its int4 linears are laid out for the CPU int4 C kernel, unavailable here ({why})"
    return None


def _lower_int4_gemv(gm: fx.GraphModule, node, plan: _BagPlan, tag, fake_mode, shared: dict | None) -> KernelRecord:
    """A thresholded int4 sparse_linear, or an int4 wq_linear _int4_kernel_rows picks -> the C kernel's op."""
    old = node.args[1:5]
    panels, sz = _made_once(shared, "cpu_int4_panels", plan.sources, lambda: _int4_gemv.pack(*plan.layout()))
    new_args = [add_buffer(gm, node, f"_ec_int4_{node.name}_{suffix}", t, tag, fake_mode)
                for suffix, t in (("panels", panels), ("sz", sz))]
    node.target = _ops.op_for(_int4_gemv.NAME)
    node.args, node.kwargs = (plan.x, plan.thr, *new_args, plan.bias, plan.out_features, plan.group, plan.label,
                              plan.decode_only), {}
    drop_unused_attrs(gm, old)  # the original layout is no longer read: do not keep (or cache) it
    return KernelRecord(_int4_gemv.NAME, f"torch.ops.effcompile.{_int4_gemv.NAME}.default", str(_int4_gemv.SOURCE),
                        "cpu-int4-gemv", ("wq_linear" if plan.thr is None else "sparse_linear", f"int4g{plan.group}"),
                        (node.name,),
                        (str(tag),) if tag is not None else ())
