"""EoRA-style low-rank compensation for Quantize: y = x W_q^T + B (A x), fitted in the activation eigenspace.

The quantization error E = W - W_q matters only along the directions the activations take: with the
calibration covariance C = V diag(l) V^T, the best rank-r fix of E x (in expectation over x) is the
truncated SVD of E V diag(sqrt(l)), mapped back through diag(1/sqrt(l)) V^T. B [N, r] and A [r, K] become
two small linears beside the quantized one; codegen fuses them into the dequant kernel when it lowers for
Triton (except W8A8), and leaves them as ordinary matmuls on the CPU paths.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext
from effcompile.passes.calibration import calibrated_for, fit_key

_EPS = 1e-6


class _Covariance(fx.Interpreter):
    """Accumulates x^T x (fp64) of the watched nodes' outputs over the calibration batches."""

    def __init__(self, gm: fx.GraphModule, watch: set[str], acc: dict[str, list]):
        super().__init__(gm)
        self.watch, self.acc = watch, acc

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            x = out.detach().reshape(-1, out.shape[-1]).double()
            entry = self.acc.setdefault(n.name, [x.new_zeros(x.shape[1], x.shape[1]), 0])  # on x's device
            entry[0] += x.T @ x
            entry[1] += x.shape[0]
        return out


def covariances(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> dict[str, torch.Tensor]:
    if not ctx.calibration:
        raise ValueError("Quantize(eora_rank=...) needs calibration data: pass effcompile(model, "
                         "calibration=[batch, ...]) with batches shaped like real inputs")
    acc: dict[str, list] = {}
    with torch.no_grad():
        for args in ctx.calibration:
            _Covariance(gm, {n.name for n in nodes}, acc).run(*args)
    return {k: s / max(n, 1) for k, (s, n) in acc.items()}


def low_rank_fix(error: torch.Tensor, cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [N, r], A [r, K], fraction of the activation-weighted error removed) for error [N, K]."""
    evals, vecs = torch.linalg.eigh(cov)
    root = evals.clamp_min(_EPS * evals.max().clamp_min(_EPS)).sqrt()
    e = error.double() @ vecs * root[None, :]  # the error as the activations see it
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = (vh[:r] / root[None, :]) @ vecs.T
    removed = 1.0 - float(s[r:].square().sum() / s.square().sum().clamp_min(1e-30))
    return b, a, removed


def compensate(gm: fx.GraphModule, ctx: PassContext, sites: list[tuple[fx.Node, fx.Node, torch.Tensor, torch.Tensor]],
               rank: int, mode, key=None) -> dict:
    """sites: (quantized node, its input node, error W - W_q as fp32, the model's weight tensor). Adds the
    B(Ax) side path after each. ``key`` (the pass config): a graph without calibration data reuses the
    factors fitted for the same weights under the same key earlier in this process (a decode graph after
    prefill-shaped calibration); with neither, raises ValueError."""
    fits = [calibrated_for(w).get(fit_key("eora", key)) for *_, w in sites]
    reused = not ctx.calibration and key is not None and all(f is not None for f in fits)
    if not reused:
        covs = covariances(gm, ctx, list({x: None for _, x, _, _ in sites}))
        fits = [low_rank_fix(err, covs[x.name], rank) if x.name in covs else None for _, x, err, _ in sites]
        for (*_, w), fit in zip(sites, fits, strict=True):
            if fit is not None and key is not None:
                calibrated_for(w)[fit_key("eora", key)] = fit
    linear = torch._C._nn.linear  # what dynamo records for F.linear, so later passes recognise it
    layers = {}
    for i, ((qnode, x, _, _), fit) in enumerate(zip(sites, fits, strict=True)):
        if fit is None:
            continue
        b, a, removed = fit
        val = ir.node_val(x)
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        # On the activations' device: a CPU buffer in a CUDA graph is copied to the GPU on every call
        # (and blocks CUDA-graph capture).
        device = val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
        tag = ir.sublayer(qnode)
        nodes = {}
        for name, t in (("a", a), ("b", b)):
            attr = f"_ec_eora_{i}_{name}"
            gm.register_buffer(attr, t.to(device=device, dtype=dtype).contiguous())
            with gm.graph.inserting_after(qnode):
                nodes[name] = gm.graph.get_attr(attr)
            nodes[name].meta[ir.VAL] = mode.from_tensor(getattr(gm, attr))
            nodes[name].meta[ir.TAG] = tag
        with gm.graph.inserting_after(nodes["a"]):
            ax = gm.graph.call_function(linear, (x, nodes["a"]))
        with gm.graph.inserting_after(ax):
            bax = gm.graph.call_function(linear, (ax, nodes["b"]))
        with gm.graph.inserting_after(bax):
            total = gm.graph.call_function(operator.add, (qnode, bax))
        qval = qnode.meta.get(ir.VAL)
        if qval is not None:
            with mode:
                ax.meta[ir.VAL] = qval.new_empty((*qval.shape[:-1], a.shape[0]))
        bax.meta[ir.VAL] = total.meta[ir.VAL] = qval
        for n in (ax, bax, total):
            n.meta[ir.TAG] = tag
        qnode.replace_all_uses_with(total, delete_user_cb=lambda user, total=total: user is not total)
        layers[tag.module if tag is not None and tag.module else qnode.name] = {
            "rank": int(a.shape[0]), "error_removed": round(removed, 4)}
    return {"rank": rank, "layers": layers, **({"reused": True} if reused else {})}
