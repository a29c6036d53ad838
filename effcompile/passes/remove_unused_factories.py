"""Canonicalize: a tensor factory call (arange, zeros, full, ...) whose result nothing reads is dropped (exact).

Captured graphs keep such calls: Hugging Face's mask code builds batch and head aranges that its SDPA path
never reads, and each would still launch a kernel every step on a GPU. fx's own dead-code elimination is
not used, since it treats in-place method calls (a cache's ``index_copy_``, ``add_``) as pure; only calls
of the factories below, which read no tensor state but their arguments and write none, are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.zeros_like, torch.ones_like,
              torch.empty_like, torch.full_like, torch.tensor, torch.scalar_tensor, torch.linspace}


@dataclass(frozen=True)
class RemoveUnusedFactories(PassConfig):
    """Remove tensor-factory calls with no readers (exact); part of the default pipeline."""


@register_pass(RemoveUnusedFactories, phase="canonicalize", invalidates=())
def remove_unused_factories(gm: fx.GraphModule, cfg: RemoveUnusedFactories, ctx: PassContext) -> PassResult:
    where = []
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and node.target in _FACTORIES and not node.users and "out" not in node.kwargs:
            gm.graph.erase_node(node)
            where.append(node.name)
    return PassResult(modified=bool(where), count=len(where), where=where[::-1])
