"""Writing your own effcompile passes: one example of each tier (see docs/passes.md).

Run it: python examples/custom_passes.py   (uses the real MiniLM-L6 weights, CPU, ~20 s)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

import effcompile as ec
from effcompile.compiler import ir
from effcompile.passes import PassContext, PassResult, register_pass, rewrite
from effcompile.passes.calibration import collect_stats


# -- Tier 1: declarative. Pattern and replacement are plain eager functions. -----------------------
def _gelu(x):
    return torch.nn.functional.gelu(x)


def _gelu_erf(x):
    return x * 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


# Exact (same math): rewrites every F.gelu into its erf form.
DecomposeGelu = rewrite("DecomposeGelu", _gelu, _gelu_erf)


# -- Tier 2: imperative. A frozen config + a function over the IR. ---------------------------------
@dataclass(frozen=True)
class ScaleResidualAdds(ec.PassConfig):
    """Multiply the sublayer side of every residual add by ``scale`` (1.0 = exact; a toy, for the docs)."""

    scale: float = 1.0
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        if not (self.scale > 0):
            raise ValueError(f"scale must be > 0, got {self.scale}")


@register_pass(ScaleResidualAdds, phase="semantic")
def scale_residual_adds(gm: fx.GraphModule, cfg: ScaleResidualAdds, ctx: PassContext) -> PassResult:
    if cfg.scale == 1.0:
        return PassResult(modified=False, note="scale=1.0 is the identity")
    where = []
    for node in list(gm.graph.nodes):
        tag = ir.sublayer(node)
        if tag is None or tag.kind != "residual":
            continue
        inner = node.args[1] if isinstance(node.args[1], fx.Node) else node.args[0]
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(torch.mul, (inner, cfg.scale))
        node.replace_input_with(inner, scaled)
        where.append(str(tag))
    return PassResult(modified=bool(where), count=len(where), where=where)


# -- Tier 3: calibrated. Statistics over calibration batches decide the rewrite. -------------------
@dataclass(frozen=True)
class ClipActivations(ec.PassConfig):
    """Clamp each FFN down-projection's input to its calibrated |x| quantile (outlier clipping)."""

    quantile: float = 0.999
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if not (0.0 < self.quantile <= 1.0):
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")


def _ffn_down_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Inputs of linears in FFN sublayers whose input is itself computed inside the FFN."""
    out = []
    for node in gm.graph.nodes:
        tag = ir.sublayer(node)
        if node.op == "call_function" and ir.target_name(node) == "linear" and tag and tag.part == "ffn":
            src = node.args[0]
            src_tag = ir.sublayer(src) if isinstance(src, fx.Node) else None
            if src_tag and (src_tag.block, src_tag.part) == (tag.block, "ffn"):
                out.append(src)
    return out


@register_pass(ClipActivations, phase="semantic")
def clip_activations(gm: fx.GraphModule, cfg: ClipActivations, ctx: PassContext) -> PassResult:
    targets = _ffn_down_inputs(gm)
    if cfg.quantile == 1.0 or not targets:
        return PassResult(modified=False, note="nothing to clip" if not targets else "quantile=1.0 keeps all")
    stats = collect_stats(gm, ctx, targets, desc="ClipActivations")
    clips = {}
    for src in targets:
        c = stats[src.name].quantile(cfg.quantile)
        clips[src.name] = c
        users = [u for u in src.users if ir.target_name(u) == "linear"]
        with gm.graph.inserting_after(src):
            clamped = gm.graph.call_function(torch.clamp, (src, -c, c))
        for u in users:
            u.replace_input_with(src, clamped)
    where = [str(ir.sublayer(s)) for s in targets]
    return PassResult(modified=True, count=len(targets), where=where, artifacts={"clip": clips})


def main() -> None:
    from effcompile.testing import load_minilm

    model, tok = load_minilm()
    texts = ["The quick brown fox jumps over the lazy dog.", "Compilers turn graphs into kernels."]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    calib = [dict(tok([t], return_tensors="pt")) for t in ["A calibration sentence.", "Another one, longer."]]
    fast = ec.effcompile(model, passes=[DecomposeGelu(), ScaleResidualAdds(1.0), ClipActivations(0.999)],
                         calibration=calib, cache=False)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = fast(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).min().item()
    print(ec.explain(fast))
    print(f"min cosine to eager: {cos:.5f}")


if __name__ == "__main__":
    main()
