"""Canonicalize: dropout in inference (training=False) is the identity, so drop it from the graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


@dataclass(frozen=True)
class RemoveDropout(PassConfig):
    """Remove dropout calls whose ``training`` argument is False (exact)."""


def _training_flag(node: fx.Node) -> bool:
    if "training" in node.kwargs:
        return bool(node.kwargs["training"])
    # F.dropout(input, p=0.5, training=True, inplace=False): training is the third positional arg.
    return bool(node.args[2]) if len(node.args) > 2 else True


@register_pass(RemoveDropout, phase="canonicalize", invalidates=())
def remove_dropout(gm: fx.GraphModule, cfg: RemoveDropout, ctx: PassContext) -> PassResult:
    where = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or ir.target_name(node) not in _DROPOUTS:
            continue
        if _training_flag(node):
            continue  # dropout in training mode is random: not ours to remove
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        where.append(node.name)
    return PassResult(modified=bool(where), count=len(where), where=where)
