"""EoRA-style low-rank compensation for Quantize: y = x W_q^T + B (A x), fitted in the activation eigenspace.

The quantization error E = W - W_q matters only along the directions the activations take: with the
calibration covariance C = V diag(l) V^T, the best rank-r fix of E x (in expectation over x) is the
truncated SVD of E V diag(sqrt(l)), mapped back through diag(1/sqrt(l)) V^T. B [N, r] and A [r, K] become
two small linears beside the quantized one; codegen fuses them into the dequant kernel when it lowers for
Triton (except W8A8), and leaves them as ordinary matmuls on the CPU paths.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext
from effcompile.passes.calibration import calibrated_for, fit_key, run_in_order

_EPS = 1e-6


def _covariance(values: list[torch.Tensor]) -> torch.Tensor:
    """E[x^T x] (fp64, on x's device) over every row of every batch's value."""
    rows = [v.detach().reshape(-1, v.shape[-1]).double() for v in values]
    return sum(x.T @ x for x in rows) / max(sum(x.shape[0] for x in rows), 1)


def low_rank_fix(error: torch.Tensor, cov: torch.Tensor, rank: int, eig=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [N, r], A [r, K], fraction of the activation-weighted error removed) for error [N, K]. ``eig``: cov's
    torch.linalg.eigh, when the caller has it (linears reading one input share it)."""
    evals, vecs = torch.linalg.eigh(cov) if eig is None else eig
    root = evals.clamp_min(_EPS * evals.max().clamp_min(_EPS)).sqrt()
    e = error.double() @ vecs * root[None, :]  # the error as the activations see it
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = (vh[:r] / root[None, :]) @ vecs.T
    removed = 1.0 - float(s[r:].square().sum() / s.square().sum().clamp_min(1e-30))
    return b, a, removed


def compensate(gm: fx.GraphModule, ctx: PassContext, sites: list[tuple[fx.Node, fx.Node, Callable, torch.Tensor]],
               rank: int, mode, key=None) -> dict:
    """sites: (quantized node, its input node, a function giving the error W - W_q as fp32, the model's weight
    tensor). Adds the B(Ax) side path after each. ``key`` (the pass config): a graph without calibration data
    reuses the factors fitted for the same weights under the same key earlier in this process (a decode graph
    after prefill-shaped calibration); with neither, raises ValueError.

    The factors are fitted in graph order in one pass over the calibration data (calibration.run_in_order): the
    side paths go in first with zero factors, then each input's covariance is taken with every upstream side
    path already fitted, its linears' factors fitted and written, and the covariance dropped. Holding every
    input's covariance and every weight's error at once, as the pass did until session 18, is ~65 GB of fp64
    covariances and 28 GB of fp32 errors for an 8B model."""
    fits = [calibrated_for(w).get(fit_key("eora", key)) for *_, w in sites]
    reused = not ctx.calibration and key is not None and all(f is not None for f in fits)
    if not reused:
        if not ctx.calibration:
            raise ValueError("Quantize(eora_rank=...) needs calibration data: pass effcompile(model, "
                             "calibration=[batch, ...]) with batches shaped like real inputs")
        # Zero factors of the fitted shapes (low_rank_fix keeps min(rank, N, K) directions of a [N, K] weight)
        # until the fit.
        fits = [(torch.zeros(w.shape[0], min(rank, *w.shape)), torch.zeros(min(rank, *w.shape), w.shape[1]), None)
                for *_, w in sites]
    linear = torch._C._nn.linear  # what dynamo records for F.linear, so later passes recognise it
    buffers = []
    for i, ((qnode, x, _, _), fit) in enumerate(zip(sites, fits, strict=True)):
        b, a, _ = fit
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
        buffers.append((getattr(gm, f"_ec_eora_{i}_b"), getattr(gm, f"_ec_eora_{i}_a")))
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
    if not reused:
        gm.recompile()
        by_input: dict[str, list[int]] = {}
        for i, (_, x, _, _) in enumerate(sites):
            by_input.setdefault(x.name, []).append(i)

        def fit(name: str, values: list[torch.Tensor]) -> None:
            cov = _covariance(values)
            eig = torch.linalg.eigh(cov)  # once for the linears reading this input (q / k / v, gate / up)
            for i in by_input[name]:
                _, _, error, w = sites[i]
                fits[i] = low_rank_fix(error(), cov, rank, eig)
                for buf, t in zip(buffers[i], fits[i][:2], strict=True):
                    buf.copy_(t)
                if key is not None:
                    calibrated_for(w)[fit_key("eora", key)] = fits[i]

        run_in_order(gm, ctx, [x for _, x, _, _ in sites], fit, desc="eora")
        unfitted = [q.name for (q, _, _, _), f in zip(sites, fits, strict=True) if f[2] is None]
        if unfitted:
            raise RuntimeError(f"EoRA: the calibration runs produced no tensor at the input of {unfitted}")
    layers = {}
    for (qnode, _, _, _), (_, a, removed) in zip(sites, fits, strict=True):
        tag = ir.sublayer(qnode)
        layers[tag.module if tag is not None and tag.module else qnode.name] = {
            "rank": int(a.shape[0]), "error_removed": round(removed, 4)}
    return {"rank": rank, "layers": layers, **({"reused": True} if reused else {})}
