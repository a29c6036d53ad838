"""Fuse: silu(gate) * up after a fused gate/up projection becomes the projection's epilogue (exact).

After FuseParallelLinears, a Llama-style MLP computes ``y = linear(x, [W_gate; W_up])`` then
``silu(y[..., :n]) * y[..., n:]``: at decode one GEMV kernel, then one row kernel that reads y back. This
pass interleaves the fused weight's outputs (row 2i = gate i, 2i + 1 = up i; for int4 sparse layouts the
two share a byte) and gives the linear op ``epilogue="silu_mul"``, so the GEMV kernel applies silu(gate) *
up to its own tile before the single store (codegen/kernels) and writes n outputs, not 2n. Each output is
still the same dot product over K, so the values are those of the unfused graph. Part of the default
pipeline, after FuseParallelLinears; it fires only where the linears run as Triton kernels (CUDA, or
TRITON_INTERPRET=1): on CPU the epilogue would be torch ops after the GEMV, nothing saved. Float linears
(cuBLAS) are left alone, and any other use of the gate or up half leaves the site alone, with a note.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

_SLICE = torch.ops.aten.slice.Tensor
_MUL = (operator.mul, torch.mul)


@dataclass(frozen=True)
class FuseGatedActivation(PassConfig):
    """Fold silu(gate) * up into the fused gate/up projection's kernel; part of the default pipeline.

    enabled=False keeps the row kernel (pass ``FuseGatedActivation(enabled=False)`` to compare)."""

    enabled: bool = True


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _half(node, linear, width: int) -> int | None:
    """0 or 1 when node is linear[..., 0:n] or linear[..., n:2n] (the last dim), else None."""
    if not (node.op == "call_function" and node.target is _SLICE and not node.kwargs and len(node.args) == 4):
        return None
    src, dim, start, end = node.args
    val = ir.tensor_val(linear)
    last = dim == -1 or (val is not None and dim == val.dim() - 1)
    if src is not linear or not last or (start, end) not in ((0, width // 2), (width // 2, width)):
        return None
    return 0 if start == 0 else 1


def _site(linear: fx.Node, width: int) -> tuple[fx.Node, list[fx.Node]] | str:
    """(the mul whose uses the fused op takes over, the nodes it replaces) or why this linear is no site."""
    halves = {}
    for user in linear.users:
        h = _half(user, linear, width)
        if h is None or h in halves:
            return "its output is read other than as a gate half and an up half"
        halves[h] = user
    if len(halves) != 2:
        return "its output is not split in two halves"
    gate, up = halves[0], halves[1]
    act = _only_user(gate)
    # (inplace=True would write into y's gate half, which nothing else reads: the same result)
    if act is None or act.op != "call_function" or ir.target_name(act) != "silu" or len(act.args) != 1 \
            or set(act.kwargs) - {"inplace"}:
        return "its gate half is not read by silu alone"
    mul = _only_user(act)
    if mul is None or mul.op != "call_function" or mul.target not in _MUL or mul.kwargs \
            or set(mul.args) != {act, up} or len(up.users) != 1:
        return "silu(gate) is not multiplied by the up half alone"
    return mul, [mul, act, gate, up]


def _interleave(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """Outputs [g0..g(n-1), u0..u(n-1)] along ``dim`` -> [g0, u0, g1, u1, ...]."""
    if t is None:
        return None
    n = t.shape[dim] // 2
    g, u = t.narrow(dim, 0, n), t.narrow(dim, n, n)
    return torch.stack((g, u), dim + 1).flatten(dim, dim + 1).contiguous()


def _interleave_int4_pairs(wt: torch.Tensor) -> torch.Tensor:
    """Input-major int4 [K, N / 2] bytes (outputs 2j / 2j + 1 in the low / high nibble) with gate outputs
    first -> gate i in the low and up i in the high nibble of byte i."""
    codes = torch.stack((wt & 15, wt >> 4), -1).flatten(-2)  # [K, N], output order
    codes = _interleave(codes, 1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(wt.dtype).contiguous()


def _rewrite(gm, node, mul, dead, ctx, mode) -> None:
    tag = ir.sublayer(node)
    base = f"_ec_gated_{node.name}"
    if node.target is qops.wq_linear_op():
        x, q, s, z, b, fmt, group = node.args[:7]
        act = node.args[7] if len(node.args) > 7 else "none"
        # Output-major: every tensor's rows are the outputs.
        q2, s2, z2, b2 = (ir.add_buffer(gm, node, f"{base}_{what}", _interleave(ir.node_tensor(gm, a, ctx.params), 0),
                                        tag, mode)
                          for what, a in (("qweight", q), ("scales", s), ("zeros", z), ("bias", b)))
        op, args = node.target, (x, q2, s2, z2, b2, fmt, group, act, "silu_mul")
        old = (q, s, z, b)
    else:
        x, thr, w, s, z, b, fmt, group, label, decode_only = node.args
        wt, st, zt, bt = (ir.node_tensor(gm, a, ctx.params) for a in (w, s, z, b))
        # Input-major: outputs along dim 1 (int8's scales and every bias along dim 0, int4 in byte pairs).
        wt = _interleave_int4_pairs(wt) if fmt == "int4" else _interleave(wt, 1)
        st = _interleave(st, 1 if fmt == "int4" else 0)
        zt, bt = _interleave(zt, 1), _interleave(bt, 0)
        w2, s2, z2, b2 = (ir.add_buffer(gm, node, f"{base}_{what}", t, tag, mode)
                          for what, t in (("weight_t", wt), ("scales", st), ("zeros", zt), ("bias", bt)))
        op, args = node.target, (x, thr, w2, s2, z2, b2, fmt, group, label, decode_only, "silu_mul")
        old = (w, s, z, b)
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(op, args)
    fused.meta.update(mul.meta)
    fused.meta[ir.TAG] = tag
    mul.replace_all_uses_with(fused)
    for n in dead + [node]:
        gm.graph.erase_node(n)
    ir.drop_unused_attrs(gm, old)


def _width(node) -> int | None:
    val = ir.tensor_val(node)
    return int(val.shape[-1]) if val is not None and isinstance(val.shape[-1], int) else None


def _feeds_silu(node) -> bool:
    return any(ir.target_name(a) == "silu" for u in node.users for a in u.users if a.op == "call_function")


@register_pass(FuseGatedActivation, phase="fuse", invalidates=())
def fuse_gated_activation(gm: fx.GraphModule, cfg: FuseGatedActivation, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    # Without Triton the epilogue would be torch ops after the GEMV on strided halves: nothing saved, and the
    # interleaved weights change how a CPU matmul associates its sums.
    if not ir.triton_runs(gm, ctx.example_inputs, ctx.params):
        return PassResult(modified=False, note="no Triton kernel runs these linears (CPU tensors, no "
                                               "TRITON_INTERPRET=1): silu(gate) * up stays a torch op")
    wq, sparse = qops.wq_linear_op(), sl.sparse_linear_op()
    sites, skipped = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (wq, sparse):
            continue
        where = str(ir.sublayer(node) or node.name)
        if node.kwargs or sl.linear_epilogue(node) != "none":
            skipped[where] = "it already has an epilogue or arguments this pass does not know"
            continue
        width = _width(node)
        if width is None or width % 2:
            continue  # not a fused pair (odd or unknown width): no site, nothing to report
        site = _site(node, width)
        if isinstance(site, str):
            if _feeds_silu(node):
                skipped[where] = site  # a gate/up projection this pass cannot take (Q/K/V ones are no sites)
            continue
        sites.append((node, *site, where))
    if not sites:
        return PassResult.rewrites([], skipped)
    mode = ir.fake_mode_for(gm, ctx.example_inputs)
    for node, mul, dead, _ in sites:
        _rewrite(gm, node, mul, dead, ctx, mode)
    return PassResult.rewrites([where for *_, where in sites], skipped)
