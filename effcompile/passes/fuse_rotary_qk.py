"""Fuse: the rotary embeddings of q and k, when both are head views of one fused projection, become one (exact).

After FuseParallelLinears, a layer's Q/K/V projection is one linear whose output is sliced: q and k are
``x[..., a:b]`` and ``x[..., b:c]`` viewed as heads, and each gets the same rotary embedding
``x cos + rotate_half(x) sin``, one kernel each at decode. Since the slices are adjacent, this pass views
``x[..., a:c]`` as heads, applies the embedding once (one kernel, over Hq + Hkv heads) and hands q and k
out as the two head ranges of its result: elementwise the same arithmetic, so the same values. Part of the
default pipeline; it fires only where those projections were fused (quantized or thresholded linears).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

_MUL = (operator.mul, torch.mul)
_ADD = (operator.add, torch.add)
_SLICE = torch.ops.aten.slice.Tensor


@dataclass(frozen=True)
class FuseRotaryQK(PassConfig):
    """Apply q's and k's rotary embedding in one op when both are slices of one projection; default pipeline.

    enabled=False keeps one per tensor (pass ``FuseRotaryQK(enabled=False)`` to compare)."""

    enabled: bool = True


@dataclass
class Rotary:
    out: fx.Node  # x cos + rotate_half(x) sin
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    nodes: list[fx.Node]  # the embedding's own nodes, consumers first


def _call(node, targets, nargs: int) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets
            and len(node.args) == nargs and not node.kwargs)


def _half(node, x) -> slice | None:
    """The slice when node is x[..., s]."""
    if not _call(node, (operator.getitem,), 2) or node.args[0] is not x:
        return None
    idx = node.args[1]
    ok = isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)
    return idx[1] if ok else None


def _rotate_half_of(cat) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, nodes) when cat is cat((-x[..., h:], x[..., :h]), -1), h half of x's last dim."""
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target is torch.cat):
        return None
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not (isinstance(parts, list | tuple) and len(parts) == 2 and dim == -1):
        return None
    neg, lo = parts
    if not _call(neg, (operator.neg, torch.neg), 1) or not isinstance(lo, fx.Node):
        return None
    x = lo.args[0] if lo.op == "call_function" and lo.args else None
    val = ir.tensor_val(x)
    if val is None or not isinstance(val.shape[-1], int) or val.shape[-1] % 2:
        return None
    h = val.shape[-1] // 2
    if _half(lo, x) != slice(None, h, None) or _half(neg.args[0], x) != slice(h, None, None):
        return None
    return x, [cat, neg, neg.args[0], lo]


def rotary_embedding(node: fx.Node) -> Rotary | None:
    """The rotary embedding ``x cos + rotate_half(x) sin`` that ends at node (its add), else None."""
    if not _call(node, _ADD, 2):
        return None
    for a, b in (node.args, node.args[::-1]):
        if not (_call(a, _MUL, 2) and _call(b, _MUL, 2)):
            continue
        for rot, sin in (b.args, b.args[::-1]):
            found = _rotate_half_of(rot)
            if found is None:
                continue
            x, inner = found
            if a.args[0] is x or a.args[1] is x:
                cos = a.args[1] if a.args[0] is x else a.args[0]
                return Rotary(node, x, cos, sin, [node, a, b, *inner])
    return None


def _head_view(x: fx.Node) -> tuple[fx.Node, int, int, tuple, fx.Node, fx.Node] | None:
    """(projection, start, stop, view shape, view, slice) when x is transpose(view(proj[..., start:stop],
    (B, S, -1, D)), 1, 2)."""
    if not (x.op == "call_method" and x.target == "transpose" and tuple(x.args[1:]) == (1, 2) and not x.kwargs):
        return None
    view = x.args[0]
    if not (isinstance(view, fx.Node) and view.op == "call_method" and view.target == "view" and len(view.args) == 2):
        return None
    shape, sl = view.args[1], view.args[0]
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[2] == -1 and isinstance(shape[3], int)):
        return None
    if not (isinstance(sl, fx.Node) and sl.op == "call_function" and sl.target is _SLICE and len(sl.args) == 4):
        return None
    proj, dim, start, stop = sl.args
    pval = ir.tensor_val(proj)
    if pval is None or dim not in (-1, pval.dim() - 1) or not all(isinstance(v, int) for v in (start, stop)):
        return None
    return proj, start, stop, shape, view, sl


def _fuse(gm: fx.GraphModule, q: Rotary, k: Rotary) -> str | None:
    hq, hk = _head_view(q.x), _head_view(k.x)
    if hq is None or hk is None:
        return "q or k is not a head view of a slice"
    if hq[0] is not hk[0] or hq[2] != hk[1] or hq[3] != hk[3]:
        return "q and k are not adjacent slices of one projection"
    if any(u not in q.nodes for u in q.x.users) or any(u not in k.nodes for u in k.x.users):
        return "q or k has readers besides its rotary embedding"
    proj, start, _, shape, qview, _ = hq
    heads_q = (hq[2] - hq[1]) // shape[3]
    g = gm.graph
    with g.inserting_before(q.out):
        sl = g.call_function(_SLICE, (proj, -1, start, hk[2]))
        x = g.call_method("transpose", (g.call_method("view", (sl, shape)), 1, 2))
        half = ir.tensor_val(q.x).shape[-1] // 2
        lo = g.call_function(operator.getitem, (x, (Ellipsis, slice(None, half, None))))
        hi = g.call_function(operator.getitem, (x, (Ellipsis, slice(half, None, None))))
        rot = g.call_function(torch.cat, ((g.call_function(operator.neg, (hi,)), lo), -1))
        out = g.call_function(operator.add, (g.call_function(operator.mul, (x, q.cos)),
                                             g.call_function(operator.mul, (rot, q.sin))))
        q_out = g.call_function(operator.getitem, (out, (slice(None), slice(None, heads_q, None))))
        k_out = g.call_function(operator.getitem, (out, (slice(None), slice(heads_q, None, None))))
    for n in (sl, x, x.args[0], lo, hi, rot, rot.args[0][0], out, *out.args, q_out, k_out):
        if ir.TAG in q.out.meta:
            n.meta[ir.TAG] = q.out.meta[ir.TAG]
    q.out.replace_all_uses_with(q_out)
    k.out.replace_all_uses_with(k_out)
    for rope in (q, k):  # the old embeddings, then their head views and slices if nothing else reads them
        for n in rope.nodes:
            g.erase_node(n)
        for n in (rope.x, rope.x.args[0], rope.x.args[0].args[0]):
            if not n.users:
                g.erase_node(n)
    return None


@register_pass(FuseRotaryQK, phase="fuse")
def fuse_rotary_qk(gm: fx.GraphModule, cfg: FuseRotaryQK, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    ropes = [r for n in gm.graph.nodes if (r := rotary_embedding(n)) is not None]
    pairs: dict[tuple, list[Rotary]] = {}
    for r in ropes:
        pairs.setdefault((r.cos, r.sin, ir.sublayer(r.out)), []).append(r)
    where, skipped = [], {}
    for (_, _, tag), found in pairs.items():
        label = str(tag or found[0].out.name)
        if len(found) != 2:
            skipped[label] = f"{len(found)} rotary embeddings share cos/sin here (q and k are two)"
            continue
        why = _fuse(gm, *found)
        if why is None:
            where.append(label)
        else:
            skipped[label] = why
    return PassResult.rewrites(where, skipped)
