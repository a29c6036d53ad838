"""Channel thresholding (calibrated activation sparsity): zero small linear inputs via effcompile::sparsify."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from effcompile.compiler import ir, sparse_ops
from effcompile.compiler import ops as qops
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes import threshold_greedy
from effcompile.passes.calibration import (
    ActivationStats,
    calibrated_for,
    collect_stats,
    collect_stats_in_order,
    fit_key,
    padding_mask,
)
from effcompile.passes.threshold_greedy import GREEDY_METRICS
from effcompile.passes.threshold_greedy import NO_THRESHOLD as _NO_THRESHOLD

BLOCK_KINDS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
# The LM head is opt-in: TEAL and CHESS leave it dense, and its input (the final norm's output) feeds every logit.
# On a small decoder it is a large share of the bytes a step reads (Llama-3.2-1B's tied head: 21 % in bf16), which
# caps what block thresholds alone can save (docs/thresholding.md).
KINDS = (*BLOCK_KINDS, "head")
_ALIASES = {"all": BLOCK_KINDS, "attn": ("attn_in", "attn_out"), "ffn": ("mlp_in", "mlp_out"),
            "mlp": ("mlp_in", "mlp_out"), "ffn_in": ("mlp_in",), "ffn_out": ("mlp_out",)}
_TAG = re.compile(r"^layers\.\d+\.(attn|ffn)$")
METHODS = ("tensor", "channel", "greedy", "greedy-channel")
_ROW_ELEMENTS = 4_000_000  # per activation: enough rows for 0.1-point quantiles, bounded memory
_NORM_ROWS = 4096  # weight rows cast / dequantized to fp32 at a time for column norms (see _Site.norms)


def _kind_names(value) -> tuple[str, ...]:
    return tuple(_ALIASES.get(value, (value,)))


@dataclass(frozen=True)
class ThresholdChannels(PassConfig):
    """Zero the inputs of targeted linears whose magnitude is below a calibrated threshold.

    sparsity: the fraction of targeted linear inputs zeroed (0 = none), model-wide, or per linear kind
        as a dict ``{"attn_in": 0.3, "mlp_in": 0.5}`` (kinds: attn_in = q/k/v, attn_out = o,
        mlp_in = gate/up, mlp_out = down, head = the linears after the last block (the LM head); aliases attn,
        ffn/mlp, all = the four block kinds, not the head).
    method: "tensor" - one threshold per linear, the |x| quantile giving the target (TEAL);
        "channel" - one threshold per input channel: |x_j| * ||W[:, j]|| (the channel's contribution
        to the output) is thresholded at its quantile (CHESS);
        "greedy" - per-tensor thresholds whose sparsity differs per (block, kind), allocated greedily
        to meet the target (weighted by weight bytes, i.e. what decode skips reading) with the least
        output error on the calibration data (TEAL's greedy search, model-wide);
        "greedy-channel" - the same greedy allocation over per-channel (CHESS) thresholds.
    targets: which linears: kinds, aliases, or exact sublayer tags ("layers.3.attn"); the head only when named,
        e.g. ``("all", "head")``.
    decode_only: True leaves prefill-shaped inputs (more than one token per sequence) dense.
    greedy_step: the sparsity grid of the greedy search; greedy_batches: calibration batches it scores on;
    greedy_metric: what it minimizes, "cosine" (per-row cosine distance of every output), "pooled" (the
        same after averaging each sequence's rows over its real tokens: the sentence embedding of a
        mean-pooling encoder, for retrieval models; only the token-level outputs count), or "mse"
        (relative squared error, which also counts the output shrinking as a whole; see docs/thresholding.md).
    skip_padding: leave padding positions (where the batch's ``attention_mask`` input is 0) out of the
        calibration statistics and the greedy objective, so the target is the sparsity of real tokens.
        Padded calibration batches are otherwise dominated by pad rows (66 % of a MiniLM batch padded
        to 64), which pulled thresholds toward the pads' magnitudes.
    """

    sparsity: Any = 0.5
    method: str = "tensor"
    targets: tuple[str, ...] = ("all",)
    decode_only: bool = False
    greedy_step: float = 0.05
    greedy_batches: int = 4
    greedy_metric: str = "cosine"
    skip_padding: bool = True
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    reads_weights: ClassVar[bool] = True  # channel thresholds depend on weight column norms
    spec_name: ClassVar[str] = "threshold"

    def __post_init__(self):
        object.__setattr__(self, "sparsity", _check_sparsity(self.sparsity))
        if self.method not in METHODS:
            raise ValueError(f"ThresholdChannels.method={self.method!r} is not supported; supported: {list(METHODS)}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if not isinstance(t, str) or not (t in KINDS or t in _ALIASES or _TAG.match(t))]
        if bad or not targets:
            raise ValueError(f"ThresholdChannels.targets={self.targets!r}: each must be one of "
                             f"{list(KINDS) + sorted(_ALIASES)} or a tag like 'layers.3.attn'; got {bad or 'nothing'}")
        object.__setattr__(self, "targets", targets)  # a tuple, so the config stays hashable
        if not isinstance(self.decode_only, bool):
            raise ValueError(f"ThresholdChannels.decode_only={self.decode_only!r}: must be True or False")
        step = self.greedy_step
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0 < step <= 0.5:
            raise ValueError(f"ThresholdChannels.greedy_step={step!r}: must be a number in (0, 0.5]")
        gb = self.greedy_batches
        if isinstance(gb, bool) or not isinstance(gb, int) or gb < 1:
            raise ValueError(f"ThresholdChannels.greedy_batches={gb!r}: must be an int >= 1")
        if not isinstance(self.skip_padding, bool):
            raise ValueError(f"ThresholdChannels.skip_padding={self.skip_padding!r}: must be True or False")
        if self.greedy_metric not in GREEDY_METRICS:
            raise ValueError(f"ThresholdChannels.greedy_metric={self.greedy_metric!r} is not supported; "
                             f"supported: {list(GREEDY_METRICS)}")

    def target_for(self, kind: str) -> float:
        if isinstance(self.sparsity, float):
            return self.sparsity
        return dict(self.sparsity).get(kind, 0.0)


def _check_sparsity(value):
    def one(v, what):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1 or math.isnan(v):
            raise ValueError(f"ThresholdChannels.sparsity{what}={v!r}: must be a number in [0, 1) "
                             "(the fraction of linear inputs zeroed; 0 = none)")
        return float(v)

    if isinstance(value, dict | tuple | list) and not isinstance(value, str):
        items = value.items() if isinstance(value, dict) else value
        out: dict[str, float] = {}
        for item in items:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise ValueError(f"ThresholdChannels.sparsity={value!r}: give a number or {{kind: number}}")
            k, v = item
            if k not in KINDS and k not in _ALIASES:
                raise ValueError(f"ThresholdChannels.sparsity: unknown kind {k!r}; kinds: {list(KINDS) + sorted(_ALIASES)}")
            for kind in _kind_names(k):
                out[kind] = one(v, f"[{k!r}]")
        if not out:
            raise ValueError("ThresholdChannels.sparsity={}: give a number or a non-empty {kind: number}")
        return tuple(sorted(out.items()))  # hashable and order-independent
    return one(value, "")


# ----------------------------------------------------------------------------- which linears
@dataclass
class _Site:
    node: fx.Node  # the linear / wq_linear
    x: fx.Node  # its input
    kind: str
    tag: ir.Sublayer
    label: str
    elements: int  # N * K of the weight: what byte weighting counts
    in_features: int
    device: torch.device
    rows: Callable[[int, int], torch.Tensor]  # rows(r0, r1): the weight's rows r0..r1 as fp32 [r1 - r0, K] (dequantized when quantized)
    source: torch.Tensor | None = None  # the model's own weight tensor (identity across graphs)
    sparsify: fx.Node | None = None  # the node inserted before it
    _norms: torch.Tensor | None = None

    def norms(self) -> torch.Tensor:
        """||W[:, j]|| per input channel (CHESS), from fp32 blocks of _NORM_ROWS rows, computed once: a whole fp32
        copy of every targeted weight, which this pass used to hold for each site, is 28 GB for an 8B model."""
        if self._norms is None:
            n = self.elements // self.in_features
            sq = sum(self.rows(r, min(r + _NORM_ROWS, n)).square().sum(0) for r in range(0, n, _NORM_ROWS))
            self._norms = sq.sqrt()
        return self._norms


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        ir.target_name(node) == "linear" or node.target is qops.wq_linear_op())


def _weight(gm: fx.GraphModule, node: fx.Node, ctx: PassContext):
    """(the weight tensor, N * K, K, its device, rows(r0, r1) as fp32), or None when it is not a 2-D model
    parameter."""
    def real(n):
        if not isinstance(n, fx.Node):
            return None
        if n.op == "placeholder":
            return ctx.params.get(n.name)
        if n.op == "get_attr":
            return getattr(gm, n.target, None)
        return None

    if node.target is qops.wq_linear_op():
        q, s, z = (real(a) for a in node.args[1:4])
        if q is None or s is None:
            return None
        fmt, group = node.args[5], node.args[6]
        n, k = q.shape[0], qops.dequantize(q[:1], s[:1], None if z is None else z[:1], fmt, group).shape[1]

        def rows(r0, r1):  # every format's codes, scales and zeros are per output row
            return qops.dequantize(q[r0:r1], s[r0:r1], None if z is None else z[r0:r1], fmt, group, torch.float32)

        return q, n * k, k, q.device, rows
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    w = real(w)
    if not (isinstance(w, torch.Tensor) and w.dim() == 2):
        return None
    return w, w.numel(), w.shape[1], w.device, lambda r0, r1: w[r0:r1].detach().float()


def _reaches_linear(start: fx.Node, tag: ir.Sublayer) -> bool:
    """Whether ``start`` is computed (within the same sublayer) from another linear's output."""
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        t = ir.sublayer(n)
        if t is None or (t.block, t.part) != (tag.block, tag.part):
            continue
        if _is_linear(n):
            return True
        todo.extend(n.all_input_nodes)
    return False


def _sites(gm: fx.GraphModule, cfg: ThresholdChannels, ctx: PassContext) -> tuple[list[_Site], dict[str, str]]:
    """Targeted linears with their kind: an "in" linear reads the sublayer's input, an "out" linear
    reads a value computed from another linear of the same sublayer (o_proj after q/k/v, down after up)."""
    kinds = {k for t in cfg.targets for k in _kind_names(t) if not _TAG.match(t)}
    tags = {t for t in cfg.targets if _TAG.match(t)}
    sites, skipped, used = [], {}, set()
    for node in gm.graph.nodes:
        if not _is_linear(node):
            continue
        tag = ir.sublayer(node)
        in_block = tag is not None and tag.block is not None and tag.part in ("attn", "ffn")
        if not (in_block or (tag is not None and tag.part == "head")):
            continue
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(x, fx.Node):
            continue
        kind = "head" if not in_block else (
            ("attn" if tag.part == "attn" else "mlp") + ("_out" if _reaches_linear(x, tag) else "_in"))
        if not (kind in kinds or str(tag) in tags) or cfg.target_for(kind) == 0:
            continue
        label = tag.module or node.name
        while label in used:  # a module called twice (shared weights) still gets its own counter
            label += "'"
        used.add(label)
        w = _weight(gm, node, ctx)
        if w is None:
            skipped[label] = "weight is not a 2-D parameter of the model"
            continue
        sites.append(_Site(node, x, kind, tag, label, *w[1:], source=w[0]))
    return sites, skipped


# ----------------------------------------------------------------------------- thresholds
def _rows(stats: ActivationStats) -> torch.Tensor:
    return stats.rows if stats.rows is not None else torch.zeros(0, 1)


class _Sample:
    """A flat sample's order statistics for threshold cuts: the first cuts by selection (torch.kthvalue, ~3x
    faster than a sort of 4M values on the CPU), then a sort made once, when a third distinct cut is asked for
    (greedy asks for many). Cuts are memoized: sites sharing an input (q / k / v) share a sample."""

    def __init__(self, values: torch.Tensor):
        self.values, self.sorted, self.cuts = values.flatten(), None, {}

    def _at(self, i: int) -> torch.Tensor:  # the i-th smallest, 0-based
        if self.sorted is None and len(self.cuts) >= 2:
            self.sorted = torch.sort(self.values).values
        return self.sorted[i] if self.sorted is not None else torch.kthvalue(self.values, i + 1).values

    def cut(self, s: float) -> float:
        """A value with a fraction ``s`` of the sample at or below it: halfway between neighbours."""
        if s not in self.cuts:
            n = self.values.numel()
            k = min(max(int(round(s * n)), 0), n)
            self.cuts[s] = (_NO_THRESHOLD if k == 0 else float(self._at(n - 1)) if k == n
                            else float((self._at(k - 1) + self._at(k)) / 2))
        return self.cuts[s]


class _Calib:
    """Per-site samples, so any sparsity's threshold is a cut of one (greedy asks for many). Sites come all at
    once (``sites`` with ``stats``) or an input at a time (``add``, as the in-order calibration sees them)."""

    def __init__(self, method: str, sites: list[_Site] = (), stats: dict[str, ActivationStats] | None = None):
        self.method = method
        self.flat: dict[str, _Sample] = {}
        self.score: dict[str, tuple[_Sample, torch.Tensor]] = {}
        self._by_input: dict[str, _Sample] = {}
        for s in sites:
            self.add(s, stats[s.x.name])

    def add(self, s: _Site, stats: ActivationStats) -> None:
        rows = _rows(stats)
        if self.method in ("channel", "greedy-channel"):
            # CHESS: a zeroed x_j removes x_j * W[:, j] from the output; rank entries by that size.
            col = s.norms().to(rows.device, rows.dtype)
            self.score[s.label] = (_Sample(rows * col), col)
        else:
            if s.x.name not in self._by_input:
                self._by_input[s.x.name] = _Sample(rows)
            self.flat[s.label] = self._by_input[s.x.name]

    def threshold(self, site: _Site, s: float) -> torch.Tensor:
        if site.label in self.score:
            sample, col = self.score[site.label]
            tau = sample.cut(s)
            if tau == _NO_THRESHOLD:
                return torch.full_like(col, _NO_THRESHOLD)
            # Per channel: |x_j| > tau / ||W[:, j]||; a channel whose column is zero is always dropped.
            return torch.where(col > 0, tau / col.clamp_min(1e-30), torch.full_like(col, math.inf)).float()
        return torch.tensor(self.flat[site.label].cut(s), dtype=torch.float32)

    def achieved(self, site: _Site, thr: torch.Tensor, rows: torch.Tensor) -> float:
        return float((rows <= thr).float().mean()) if rows.numel() else 0.0


# ----------------------------------------------------------------------------- the pass
def _buffer_name(label: str) -> str:
    return "_ec_thr_" + re.sub(r"\W", "_", label)


def _summary(thr: torch.Tensor) -> float | dict:
    if thr.dim() == 0:
        return round(float(thr), 6)
    finite = thr[torch.isfinite(thr)]
    if finite.numel() == 0:
        return {"channels": thr.numel(), "dropped_always": thr.numel()}
    q = torch.quantile(finite, torch.tensor([0.0, 0.5, 1.0])).tolist()
    return {"channels": thr.numel(), "min": round(q[0], 6), "median": round(q[1], 6), "max": round(q[2], 6)}


def _dense(s: _Site, method: str) -> torch.Tensor:
    """A threshold that keeps every value, shaped as the method's thresholds are (one, or one per channel)."""
    if method in ("channel", "greedy-channel"):
        return torch.full((s.in_features,), _NO_THRESHOLD)
    return torch.tensor(_NO_THRESHOLD)


def _insert(gm, s: _Site, thr: torch.Tensor, mode, decode_only: bool) -> torch.Tensor:
    name = _buffer_name(s.label)
    # A buffer, not a constant: the cache stores it as safetensors, and changing its value later
    # (thresholds(compiled)[label].fill_(...)) changes behaviour without recompiling anything. On the
    # weight's device: a CPU threshold beside CUDA weights was copied to the GPU on every call, which
    # synchronizes each linear and cannot be captured in a CUDA graph (H100, session 7: 23.6 tok/s).
    gm.register_buffer(name, thr.detach().clone().to(s.device))
    buf = getattr(gm, name)
    with gm.graph.inserting_before(s.node):
        thr_node = gm.graph.get_attr(name)
        sp = gm.graph.call_function(sparse_ops.sparsify_op(), (s.x, thr_node, s.label, decode_only))
    thr_node.meta[ir.VAL] = mode.from_tensor(buf)
    sp.meta[ir.VAL] = ir.tensor_val(s.x)
    for n in (thr_node, sp):
        n.meta[ir.TAG] = s.tag
    sp.meta["nn_module_stack"] = s.node.meta.get("nn_module_stack", {})
    s.node.replace_input_with(s.x, sp)
    s.sparsify = sp
    return buf


def _reuse(gm, sites, cfg, ctx, base, skipped) -> PassResult | None:
    found = [calibrated_for(s.source).get(fit_key("threshold", cfg, s.label)) if s.source is not None else None
             for s in sites]
    if any(f is None for f in found):
        return None  # collect_stats then raises the clear "no calibration data" error
    mode = ir.fake_mode_for(gm, ctx.example_inputs)
    layers = {}
    for s, (thr, info) in zip(sites, found, strict=True):
        _insert(gm, s, thr, mode, cfg.decode_only)
        layers[s.label] = info
    total = sum(s.elements for s in sites)
    weighted = sum(layers[s.label]["target"] * s.elements for s in sites) / total
    note = ("no calibration data reached this graph (e.g. a decode step after prefill-shaped calibration): "
            "thresholds reused from the graph of this model calibrated earlier in this process")
    return PassResult(modified=True, count=len(sites), where=[str(s.tag) for s in sites], note=note,
                      artifacts={**base, "layers": layers, "dense": skipped, "weighted_target": round(weighted, 4),
                                 "reused": True})


@register_pass(ThresholdChannels, phase="semantic", invalidates=())  # sets meta itself (as Quantize)
def threshold_channels(gm: fx.GraphModule, cfg: ThresholdChannels, ctx: PassContext) -> PassResult:
    """Insert effcompile::sparsify(x, threshold, label, decode_only) before each targeted linear."""
    base = {"method": cfg.method, "target": cfg.sparsity if isinstance(cfg.sparsity, float) else dict(cfg.sparsity),
            "decode_only": cfg.decode_only}
    if isinstance(cfg.sparsity, float) and cfg.sparsity == 0:
        return PassResult(modified=False, artifacts=base, note="sparsity 0: nothing to zero, no sparsify inserted")
    sites, skipped = _sites(gm, cfg, ctx)
    if not sites:
        note = "; ".join(f"{k} kept dense: {v}" for k, v in skipped.items()) or (
            f"no linear matches targets {list(cfg.targets)} at a sparsity above 0")
        return PassResult(modified=False, artifacts={**base, "dense": skipped}, note=note)
    if not ctx.calibration:
        reused = _reuse(gm, sites, cfg, ctx, base, skipped)
        if reused is not None:
            return reused
    inputs = {s.x.name: s.x for s in sites}
    width = max(ir.tensor_val(x).shape[-1] for x in inputs.values() if ir.tensor_val(x) is not None)
    rows = max(256, min(16384, _ROW_ELEMENTS // max(width, 1)))
    mode = ir.fake_mode_for(gm, ctx.example_inputs)
    alloc = {s.label: cfg.target_for(s.kind) for s in sites}
    extra: dict[str, Any] = {}
    greedy = cfg.method in ("greedy", "greedy-channel")
    # decode_only=False while calibrating (the calibration batches are prefill-shaped); set at the end.
    if greedy:  # the greedy search scores every (block, kind) alone, with thresholds cut from the dense model
        from_dense = _Calib(cfg.method, sites, collect_stats(gm, ctx, list(inputs.values()), rows=rows,
                                                             desc="threshold_channels dense",
                                                             skip_padding=cfg.skip_padding))
        bufs = {s.label: _insert(gm, s, from_dense.threshold(s, alloc[s.label]), mode, False) for s in sites}
    else:  # placeholders of the thresholds' shape: the fit below sets each before anything reads it
        bufs = {s.label: _insert(gm, s, _dense(s, cfg.method), mode, False) for s in sites}
    gm.recompile()
    # Thresholds cut from the dense model undershoot downstream: an o_proj or down_proj input computed from
    # sparsified q/k/v or gate/up (and every later block) is smaller than in the dense model, so more of it
    # falls below a dense-calibrated threshold (+2..7 points on the stdlib LM). So each input's thresholds are
    # cut from its values with every upstream threshold already in place: one pass of the calibration batches
    # through the graph in lockstep (collect_stats_in_order), where re-collecting twice with the thresholds in
    # place (sessions 3-18) ran the model three times and only approached that fixed point.
    calib = _Calib(cfg.method)
    by_input: dict[str, list[_Site]] = {}
    for s in sites:
        by_input.setdefault(s.x.name, []).append(s)

    def fit(name: str, st: ActivationStats) -> None:
        for s in by_input[name]:
            calib.add(s, st)
            bufs[s.label].copy_(calib.threshold(s, alloc[s.label]))

    with sparse_ops.not_measuring():  # the pass's own runs are not the model's sparsity
        if greedy:
            alloc, extra = threshold_greedy.allocate(gm, sites, bufs, from_dense, cfg, ctx)
        stats = collect_stats_in_order(gm, ctx, list(inputs.values()), fit, desc="threshold_channels", rows=rows,
                                       skip_padding=cfg.skip_padding)
    unfitted = [s.label for s in sites if s.label not in calib.flat and s.label not in calib.score]
    if unfitted:
        raise RuntimeError(f"threshold_channels: the calibration runs produced no tensor at the input of {unfitted}; "
                           "their thresholds cannot be calibrated")
    layers: dict[str, dict] = {}
    for s in sites:
        thr = calib.threshold(s, alloc[s.label])
        bufs[s.label].copy_(thr)
        s.sparsify.args = (s.x, s.sparsify.args[1], s.label, cfg.decode_only)
        rows_x = _rows(stats[s.x.name])
        layers[s.label] = {"kind": s.kind, "tag": str(s.tag), "target": round(alloc[s.label], 4),
                           "calibrated": round(calib.achieved(s, thr, rows_x), 4), "threshold": _summary(thr),
                           "weight_elements": s.elements}
        if s.source is not None:
            calibrated_for(s.source)[fit_key("threshold", cfg, s.label)] = (thr.clone(), dict(layers[s.label]))
    total = sum(s.elements for s in sites)
    masks = [padding_mask(gm, args) for args in ctx.calibration] if cfg.skip_padding else []
    if any(m is not None for m in masks):  # what share of the calibration positions was padding, left out
        pads = sum(int((~m).sum()) for m in masks if m is not None)
        base["padding_left_out"] = round(pads / sum(m.numel() for m in masks if m is not None), 4)
    artifacts = {**base, **extra, "layers": layers, "dense": skipped,
                 "weighted_target": round(sum(alloc[s.label] * s.elements for s in sites) / total, 4),
                 "calibration_rows": {k: int(v.count) for k, v in stats.items()}}
    note = extra.get("fallback", "")
    if skipped:
        note = "; ".join([note] * bool(note) + [f"{k} kept dense: {v}" for k, v in skipped.items()])
    return PassResult(modified=True, count=len(sites), where=[str(s.tag) for s in sites], artifacts=artifacts, note=note)


# ----------------------------------------------------------------------------- runtime access
def thresholds(compiled) -> dict[str, torch.Tensor]:
    """The live threshold buffers of a compiled model, by layer label. Changing them in place
    (``.fill_``, ``.mul_``, ``.copy_``) changes the next call's sparsity without recompiling. Linears that
    FuseParallelLinears fused (Q/K/V, gate/up with equal thresholds) share one buffer: changing one
    changes them all (``FuseParallelLinears(enabled=False)`` keeps one per linear)."""
    from effcompile.compiler.api import explain

    out: dict[str, torch.Tensor] = {}
    for g in explain(compiled).graphs:
        for gm in g.graph_modules():
            for n in gm.graph.nodes:
                if n.op != "get_attr" or not n.target.startswith("_ec_thr_"):
                    continue
                for user in n.users:
                    # The label is the last string argument of sparsify and of the fused sparse linears
                    # (which take a weight-format string before it).
                    label = next((a for a in reversed(user.args) if isinstance(a, str)), None)
                    for part in sparse_ops.label_parts(label) if label is not None else ():
                        out[part] = getattr(gm, n.target)
    return out


__all__ = ["BLOCK_KINDS", "KINDS", "METHODS", "ThresholdChannels", "threshold_channels", "thresholds"]
