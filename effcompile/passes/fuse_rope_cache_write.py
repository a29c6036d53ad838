"""Fuse: the rotary embedding whose k goes only into a K/V cache write joins that write (exact).

At decode a layer runs its rotary embedding (one kernel for q and k after FuseRotaryQK, or k's own) and then
its cache update (effcompile::kv_cache_write after FuseCacheWrites), and the rotated k is read by nothing but
the update. This pass hands the update the embedding's input instead: effcompile::rope_kv_cache_write
rotates k's heads on their way into the cache and returns q's rotated heads, so one kernel replaces two, with
the same arithmetic op for op (compiler/cache_ops.rope_kv_cache_write_eager is the definition). Part of the
default pipeline, after FuseCacheWrites and FuseRotaryQK; it fires only where Triton runs the update (CUDA or
TRITON_INTERPRET=1): on a CPU the update is lowered back to torch ops, where fusing saves nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.cache_ops import kv_cache_write_op, rope_kv_cache_write_op
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes.fuse_rotary_qk import Rotary, rotary_embedding


@dataclass(frozen=True)
class FuseRopeCacheWrite(PassConfig):
    """Rotate k inside its K/V cache write (and q with it); part of the default pipeline.

    enabled=False keeps the embedding a kernel of its own (pass ``FuseRopeCacheWrite(enabled=False)``)."""

    enabled: bool = True


def _heads(node, rope: fx.Node, start: bool) -> int | None:
    """h when node is rope[:, h:] (start) or rope[:, :h] (not start)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[0] is rope and len(node.args) == 2):
        return None
    idx = node.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None)):
        return None
    s = idx[1]
    if not isinstance(s, slice) or s.step is not None:
        return None
    bound = s.start if start else s.stop
    other = s.stop if start else s.start
    return bound if isinstance(bound, int) and bound > 0 and other is None else None


def _site(k: fx.Node, write: fx.Node, order: dict) -> tuple[Rotary, int, fx.Node | None] | str | None:
    """(embedding, q's head count, q's node or None) when write's k is the embedding's output (k alone) or its
    heads from h on (q's and k's, q = [:, :h]); a reason when it is an embedding this pass cannot take; None
    when k comes from no embedding at all."""
    q_node, heads_q = None, 0
    rope = rotary_embedding(k)
    if rope is None:  # else k may be the embedding's heads from h on, and q its heads before h
        src = k.args[0] if isinstance(k, fx.Node) and k.args else None
        rope = rotary_embedding(src) if isinstance(src, fx.Node) else None
        if rope is None:
            return None
        heads_q = _heads(k, src, start=True)
        if heads_q is None:
            return "k is not the embedding's heads from some h on"
        readers = set(rope.out.users) - {k}
        q_node = next(iter(readers)) if len(readers) == 1 else None
        if q_node is None or _heads(q_node, rope.out, start=False) != heads_q:
            return "the embedding is read besides as q's heads and k's"
        if any(order[u] < order[write] for u in q_node.users):
            return "q is read before the cache write"
    if len(k.users) != 1:  # k is the embedding itself, or its heads from h on
        return "the rotated k is read besides by the cache write"
    vals = [ir.tensor_val(t) for t in (rope.x, rope.cos, rope.sin)]
    if any(v is None for v in vals) or vals[0].dim() != 4 or not isinstance(vals[0].shape[-1], int):
        return "q/k or cos/sin of unknown shape"
    if len({v.dtype for v in vals}) != 1:
        return "cos/sin differ in dtype from q/k (eager promotes the products)"
    return rope, heads_q, q_node


@register_pass(FuseRopeCacheWrite, phase="fuse")
def fuse_rope_cache_write(gm: fx.GraphModule, cfg: FuseRopeCacheWrite, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    if not ir.triton_runs(gm, ctx.example_inputs, ctx.params):
        return PassResult(modified=False, note="no Triton kernel runs the cache writes (CPU tensors, no "
                                               "TRITON_INTERPRET=1): the rotary embedding stays its own op")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    g = gm.graph
    where, skipped = [], {}
    for write in list(g.nodes):
        if write.op != "call_function" or write.target is not kv_cache_write_op():
            continue
        keys, values, k, v, position, length = write.args
        label = str(ir.sublayer(write) or write.name)
        site = _site(k, write, order)
        if site is None:
            continue
        if isinstance(site, str):
            skipped[label] = site
            continue
        rope, heads_q, q_node = site
        with g.inserting_before(write):
            fused = g.call_function(rope_kv_cache_write_op(),
                                    (keys, values, rope.x, rope.cos, rope.sin, v, position, length, heads_q))
        x = ir.tensor_val(rope.x)
        fused.meta[ir.VAL] = x.new_empty((x.shape[0], heads_q, *x.shape[2:]))  # contiguous, as the op returns
        if ir.TAG in write.meta:
            fused.meta[ir.TAG] = write.meta[ir.TAG]
        if q_node is not None:
            q_node.replace_all_uses_with(fused)
        for n in (write, k, *((q_node,) if q_node is not None else ()), *(n for n in rope.nodes if n is not k)):
            g.erase_node(n)
        where.append(label)
    return PassResult.rewrites(where, skipped)
