"""SmoothQuant-style smoothing for Quantize: move activation outliers into the weights, per input channel.

For the linears that read one activation x (q/k/v share the attention norm's output, gate/up the MLP
norm's), s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) over calibration data; the graph then computes
(x / s) @ (W * s)^T, which is the same product with flatter activations. The division is an explicit
row-wise multiply right after x, so codegen fuses it into the norm kernel that produced x (the norm's
own parameters stay untouched: they may also feed a residual stream, as in post-LN BERT).
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext
from effcompile.passes.calibration import calibrated_for, collect_stats, fit_key


def smooth(gm: fx.GraphModule, ctx: PassContext, sites: list[tuple[fx.Node, fx.Node, torch.Tensor]], alpha: float,
           mode, key=None) -> tuple[dict[fx.Node, torch.Tensor], dict]:
    """sites: (linear node, its input node, its real weight). Rewires each linear to read x / s and
    returns ({linear: W * s}, artifacts). ``key`` (the pass config): a graph without calibration data
    reuses the scales calibrated for the same weights under the same key earlier in this process (a
    decode graph after prefill-shaped calibration); with neither, raises ValueError."""
    groups: dict[fx.Node, list[tuple[fx.Node, torch.Tensor]]] = defaultdict(list)
    for lin, x, w in sites:
        groups[x].append((lin, w))
    found = {x: calibrated_for(members[0][1]).get(fit_key("smooth", key)) for x, members in groups.items()}
    reused = not ctx.calibration and key is not None and all(v is not None for v in found.values())
    if not reused:
        stats = collect_stats(gm, ctx, list(groups), desc="smoothing")
        found = {}
        for x, members in groups.items():
            st = stats.get(x.name)
            if st is None or st.absmax is None:
                continue
            a = st.absmax.float().clamp_min(1e-5)
            wmax = torch.stack([w.detach().float().abs().amax(0) for _, w in members]).amax(0).clamp_min(1e-5)
            found[x] = ((a.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-4, 1e4), round(float(a.max()), 3))
            for _, w in members:
                if key is not None:
                    calibrated_for(w)[fit_key("smooth", key)] = found[x]
    smoothed: dict[fx.Node, torch.Tensor] = {}
    summary = {}
    for i, (x, members) in enumerate(groups.items()):
        if x not in found:
            continue
        s, amax = found[x]
        name = f"_ec_smooth_{i}"
        val = ir.node_val(x)
        inv = (1.0 / s).to(val.dtype if isinstance(val, torch.Tensor) else torch.float32)
        gm.register_buffer(name, inv)
        first = min((lin for lin, _ in members), key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_before(first):
            inv_node = gm.graph.get_attr(name)
            xs = gm.graph.call_function(operator.mul, (x, inv_node))
        inv_node.meta[ir.VAL] = mode.from_tensor(inv)
        xs.meta[ir.VAL] = x.meta.get(ir.VAL)
        xs.meta[ir.TAG] = ir.sublayer(first)
        for lin, w in members:
            lin.replace_input_with(x, xs)
            smoothed[lin] = (w.detach().float() * s[None, :]).to(w.dtype)
        tag = ir.sublayer(first)
        summary[(tag.module if tag is not None and tag.module else first.name)] = {
            "linears": len(members), "scale_min": round(float(s.min()), 4), "scale_max": round(float(s.max()), 4),
            "activation_absmax_max": amax}
    return smoothed, {"alpha": alpha, "groups": summary, **({"reused": True} if reused else {})}
