"""Fuse: a boolean attention mask read by many SDPA calls is made additive once, not inside every call (exact).

SDPA turns a boolean ``attn_mask`` into an additive one (0 where True, -inf where False, in the query's
dtype) on every call, before its kernel: on CUDA, two one-element fills and a ``where`` per call (3
kernels per layer and decode step; 48 of a Llama-3.2-1B step's ~340 in session 10's H100 profile). Hugging
Face builds one mask per forward and passes it to every layer, so this pass converts it once, right after
it is made, and gives every SDPA (or ``effcompile::gqa_attention``) that read it the additive mask: the
same values SDPA would have computed, so the same result. Part of the default pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F  # its scaled_dot_product_attention is the graph's torch._C._nn one

from effcompile.compiler import attention_ops, ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class AdditiveAttentionMask(PassConfig):
    """Convert a boolean attention mask shared by several attention calls to an additive one, once.

    enabled=False leaves every call to convert it (pass ``AdditiveAttentionMask(enabled=False)`` to compare)."""

    enabled: bool = True


def _mask_arg(node: fx.Node) -> tuple[str | int, object] | None:
    """(where the mask argument sits: a kwarg name or a position, the argument) of an attention call."""
    if node.op != "call_function":
        return None
    if node.target is F.scaled_dot_product_attention:
        if "attn_mask" in node.kwargs:
            return "attn_mask", node.kwargs["attn_mask"]
        return (3, node.args[3]) if len(node.args) > 3 else None
    if node.target in attention_ops.attention_op_targets():
        return 3, node.args[3]
    return None


def _readers(gm: fx.GraphModule) -> tuple[dict[tuple[fx.Node, torch.dtype], list[fx.Node]], dict[str, str]]:
    """Attention calls grouped by (boolean mask node, query dtype); and why other calls were left alone."""
    groups: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = {}
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        found = _mask_arg(node)
        if found is None or found[1] is None:
            continue
        mask, tag = found[1], str(ir.sublayer(node) or node.name)
        q = node.args[0] if node.args else node.kwargs.get("query")
        mval, qval = ir.tensor_val(mask), ir.tensor_val(q)
        if mval is None or qval is None:
            skipped[tag] = "mask or query dtype unknown"
        elif mval.dtype != torch.bool:
            skipped[tag] = "the mask is already additive"
        else:
            groups.setdefault((mask, qval.dtype), []).append(node)
    return groups, skipped


def _replace_mask(call: fx.Node, additive: fx.Node) -> None:
    where, _ = _mask_arg(call)
    if isinstance(where, str):
        call.kwargs = {**call.kwargs, where: additive}
    else:
        args = list(call.args)
        args[where] = additive
        call.args = tuple(args)


@register_pass(AdditiveAttentionMask, phase="fuse")
def additive_attention_mask(gm: fx.GraphModule, cfg: AdditiveAttentionMask, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    groups, skipped = _readers(gm)
    where = []
    for (mask, dtype), calls in groups.items():
        if len(calls) < 2:  # converted once either way
            skipped[str(ir.sublayer(calls[0]) or calls[0].name)] = "the only reader of its mask"
            continue
        # What SDPA does per call (aten's convert_boolean_attn_mask): 0 where attended, -inf elsewhere, in
        # the query's dtype; both values are exact in every float dtype.
        with gm.graph.inserting_after(mask):
            blocked = gm.graph.call_function(torch.full_like, (mask, float("-inf")), {"dtype": dtype})
        with gm.graph.inserting_after(blocked):  # in place on the fresh tensor: out of place adds a copy
            additive = gm.graph.call_method("masked_fill_", (blocked, mask, 0.0))
        for n in (blocked, additive):
            if ir.TAG in mask.meta:
                n.meta[ir.TAG] = mask.meta[ir.TAG]
        for call in calls:
            _replace_mask(call, additive)
            where.append(str(ir.sublayer(call) or call.name))
    return PassResult.rewrites(where, skipped)
