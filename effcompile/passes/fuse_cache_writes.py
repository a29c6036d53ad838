"""Fuse: a layer's K/V cache update (two index copies, and the positions and length counter they use) into
effcompile::kv_cache_write, one kernel instead of up to five (exact).

Matched per layer, as a static cache's ``update`` traces:

    position = torch.arange(n) + length      # optional: else ``position`` is any index tensor
    length.add_(n)
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)

The fused op sits where the second copy was. That moves the counter's increment and the first copy later,
so the rewrite is refused when anything reads ``length`` between its increment and the second copy, or the
cache between the two copies (their readers would see another value); the arange and add are folded in
only when nothing else reads them. Part of the default pipeline.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.cache_ops import kv_cache_write_op
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class FuseCacheWrites(PassConfig):
    """Fuse each layer's K/V cache update into one op; part of the default pipeline.

    enabled=False keeps the torch ops (pass ``FuseCacheWrites(enabled=False)`` to compare)."""

    enabled: bool = True


def _is_method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _copy_args(node: fx.Node) -> tuple | None:
    """(cache, dim, index, source) of ``cache.index_copy_(dim, index, source)``."""
    if not _is_method(node, "index_copy_") or node.kwargs or len(node.args) != 4:
        return None
    return node.args


def _counter_update(index: fx.Node, n: int) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(length, arange, add_) when ``index`` is ``arange(n) + length`` and ``length.add_(n)`` follows."""
    if not (index.op == "call_function" and index.target in (operator.add, torch.add) and len(index.args) == 2
            and not index.kwargs):
        return None
    for ar, length in (index.args, index.args[::-1]):
        if (isinstance(ar, fx.Node) and ar.op == "call_function" and ar.target is torch.arange
                and ar.args == (n,) and set(ar.kwargs) <= {"device"} and isinstance(length, fx.Node)):
            break
    else:
        return None
    val = ir.tensor_val(length)
    if val is None or val.dim() != 0 or val.dtype != torch.int64 or len(ar.users) != 1:
        return None
    bumps = [u for u in length.users if _is_method(u, "add_") and u.args == (length, n) and not u.kwargs]
    return (length, ar, bumps[0]) if len(bumps) == 1 else None


def _readers_between(node: fx.Node, lo: int, hi: int, order: dict, besides: set) -> bool:
    return any(lo < order[u] < hi for u in node.users if u not in besides)


def _plan(pair: list[fx.Node], order: dict) -> tuple[tuple, list[fx.Node]] | str:
    """((keys, values, k, v, position, length), nodes to erase) for one layer's two copies, or why not."""
    (kc, dim, index, k), (vc, dim2, _, v) = (_copy_args(n) for n in pair)
    vals = [ir.tensor_val(t) for t in (kc, vc, k, v)]
    if any(t is None or t.dim() != 4 for t in vals):
        return "not 4-D tensors of known shape"
    if {dim, dim2} - {2, -2}:
        return f"copies along dim {dim}, not the sequence dim 2"
    if kc is vc:
        return "keys and values are one tensor"
    if any(u for u in pair if u.users):
        return "an index_copy_ result is read"
    first, last = order[pair[0]], order[pair[1]]
    if _readers_between(kc, first, last, order, set(pair)) or _readers_between(vc, first, last, order, set(pair)):
        return "the cache is read between its two copies"
    n = vals[2].shape[2]
    found = _counter_update(index, n) if isinstance(n, int) and len(index.users) == 2 else None
    if found is not None:
        length, ar, bump = found
        if not _readers_between(length, order[bump], last, order, {bump}):
            return (kc, vc, k, v, None, length), [*pair, bump, index, ar]
    return (kc, vc, k, v, index, None), list(pair)


@register_pass(FuseCacheWrites, phase="fuse")
def fuse_cache_writes(gm: fx.GraphModule, cfg: FuseCacheWrites, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_index: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if (args := _copy_args(node)) is not None and isinstance(args[2], fx.Node):
            by_index.setdefault(args[2], []).append(node)
    where, skipped = [], {}
    for copies in by_index.values():
        tag = str(ir.sublayer(copies[-1]) or copies[-1].name)
        if len(copies) != 2:
            skipped[tag] = f"{len(copies)} index copies share one index (a K/V pair is two)"
            continue
        plan = _plan(copies, order)
        if isinstance(plan, str):
            skipped[tag] = plan
            continue
        args, dead = plan
        with gm.graph.inserting_after(copies[1]):
            fused = gm.graph.call_function(kv_cache_write_op(), args)
        fused.meta[ir.VAL] = None
        if ir.TAG in copies[1].meta:
            fused.meta[ir.TAG] = copies[1].meta[ir.TAG]
        for node in dead:  # copies first: the index they read goes after them
            gm.graph.erase_node(node)
        where.append(tag)
    return PassResult.rewrites(where, skipped)
