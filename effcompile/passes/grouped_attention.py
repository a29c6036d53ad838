"""Fuse: SDPA over K/V heads repeated for grouped-query attention reads the shared heads instead (exact).

Hugging Face's SDPA attention repeats every K/V head for its query heads before the call whenever it
passes an attention mask (``repeat_kv``: ``x[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s,
d)``), which a static KV cache always does at decode. The reshape of an expanded view is a copy: of the
whole cache, both K and V, every layer, every step (a Llama-3.2-1B with a 4096-token cache would copy
~0.6 GB per decoded token; two extra kernels per layer whatever the length). This pass rewrites
``sdpa(q, repeat(k), repeat(v), ...)`` into ``effcompile::gqa_attention(q, k, v, ...)``, which runs SDPA
with ``enable_gqa=True`` where a fused backend takes it and repeats as before where none does
(compiler/attention_ops.py). Part of the default pipeline.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F  # its scaled_dot_product_attention is the graph's torch._C._nn one

from effcompile.compiler import attention_ops, ir  # noqa: F401 - attention_ops registers the op
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

_ALL = slice(None, None, None)


@dataclass(frozen=True)
class GroupedQueryAttention(PassConfig):
    """Run SDPA on un-repeated K/V heads (grouped-query attention); part of the default pipeline.

    enabled=False keeps the repeated heads (pass ``GroupedQueryAttention(enabled=False)`` to compare).
    decode_kernel=True runs one-token (decode) calls in effcompile's Triton kernels instead of SDPA
    (codegen/kernels/decode_attention.py: split over the cache, blocks the mask hides are not read, a PDL
    launch on Hopper); off by default until timed on a GPU."""

    enabled: bool = True
    decode_kernel: bool = False


def _unrepeated(node) -> tuple[fx.Node, int] | str:
    """(the [b, kv, s, d] source, repeats) when ``node`` is repeat_kv's reshape(expand(x[:, :, None])), else
    why not."""
    if not (isinstance(node, fx.Node) and ir.target_name(node) == "reshape" and node.op == "call_method"):
        return "K/V are not a reshape"
    exp = node.args[0]
    if not (isinstance(exp, fx.Node) and exp.op == "call_method" and exp.target == "expand"):
        return "K/V are not a reshape of an expand"
    idx = exp.args[0]
    if not (isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is operator.getitem
            and idx.args[1] == (_ALL, _ALL, None, _ALL, _ALL)):
        return "K/V are not expanded from x[:, :, None]"
    src, out, expanded = idx.args[0], ir.tensor_val(node), ir.tensor_val(exp)
    if out is None or expanded is None or expanded.dim() != 5 or out.dim() != 4:
        return "K/V shapes unknown"
    b, kv, rep, s, d = expanded.shape
    if tuple(out.shape) != (b, kv * rep, s, d):
        return "the reshape does not merge the repeats into the head dimension"
    if len(node.users) != 1 or len(exp.users) != 1 or len(idx.users) != 1:
        return "the repeated K/V have other readers"
    return src, int(rep)


def _rewrite(gm: fx.GraphModule, sdpa: fx.Node, decode_kernel: bool = False) -> str | None:
    """Replace one SDPA node; None when done, else why not."""
    kw = dict(sdpa.kwargs)
    q, k, v = (sdpa.args[i] if i < len(sdpa.args) else kw.pop(n, None) for i, n in enumerate(("query", "key", "value")))
    if len(sdpa.args) > 3 or set(kw) - {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}:
        return "arguments this pass does not know"
    if kw.get("enable_gqa"):
        return "already grouped"
    ks, vs = _unrepeated(k), _unrepeated(v)
    if isinstance(ks, str) or isinstance(vs, str):
        return ks if isinstance(ks, str) else vs
    if ks[1] != vs[1]:
        return "K and V repeated differently"
    op = torch.ops.effcompile.decode_gqa_attention if decode_kernel else torch.ops.effcompile.gqa_attention
    with gm.graph.inserting_before(sdpa):
        new = gm.graph.call_function(
            op.default,
            (q, ks[0], vs[0], kw.get("attn_mask"), float(kw.get("dropout_p", 0.0)), bool(kw.get("is_causal", False)),
             kw.get("scale")))
    new.meta.update(sdpa.meta)
    sdpa.replace_all_uses_with(new)
    gm.graph.erase_node(sdpa)
    for reshape in (k, v):  # reshape, expand, getitem: now unread
        for node in (reshape, reshape.args[0], reshape.args[0].args[0]):
            if not node.users:
                gm.graph.erase_node(node)
    return None


@register_pass(GroupedQueryAttention, phase="fuse", invalidates=())
def grouped_query_attention(gm: fx.GraphModule, cfg: GroupedQueryAttention, ctx: PassContext) -> PassResult:
    if not cfg.enabled:
        return PassResult(modified=False, note="disabled")
    where, skipped = [], {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        tag = str(ir.sublayer(node) or node.name)
        why = _rewrite(gm, node, cfg.decode_kernel)
        if why is None:
            where.append(tag)
        else:
            skipped[tag] = why
    return PassResult.rewrites(where, skipped)
