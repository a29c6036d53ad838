"""Static layer skipping: bypass whole blocks, attention or FFN sublayers through their residual."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass

UNITS = ("block", "attn", "ffn", "sublayer")  # "sublayer": attn and ffn are separate candidates (FinerCut)
METHODS = ("cosine", "uniform", "greedy")
_NAME = re.compile(r"^layers\.(\d+)(?:\.(attn|ffn))?$")


@dataclass(frozen=True)
class SkipLayers(PassConfig):
    """Remove ``num`` units (or enough for a target ``speedup``) by a residual bypass: output := input.

    unit: "block" (attn + ffn of one layer), "attn", "ffn", or "sublayer" (either, chosen per sublayer).
    method: "cosine" - lowest 1 - cos(input, output) on calibration data first (LLM-Streamline,
    FFN-SkipLLM); "uniform" - evenly spaced units (Unified Layer Skipping, no data needed);
    "greedy" - remove one unit at a time, the one that changes the graph's outputs least (FinerCut).
    layers: an explicit skip set instead ("layers.3", "layers.2.attn"); no calibration needed.
    """

    num: int = 0
    unit: str = "block"
    method: str = "cosine"
    speedup: float | None = None  # estimated from FLOPs; exclusive with num
    layers: tuple[str, ...] = ()
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.num, bool) or not isinstance(self.num, int) or self.num < 0:
            raise ValueError(f"SkipLayers.num={self.num!r}: must be an int >= 0 (units to remove; 0 = none)")
        if self.unit not in UNITS:
            raise ValueError(f"SkipLayers.unit={self.unit!r} is not supported; valid: {list(UNITS)}")
        if self.method not in METHODS:
            raise ValueError(f"SkipLayers.method={self.method!r} is not supported; valid: {list(METHODS)}")
        if self.speedup is not None:
            if isinstance(self.speedup, bool) or not isinstance(self.speedup, int | float) or not self.speedup > 1:
                raise ValueError(f"SkipLayers.speedup={self.speedup!r}: must be None or a number > 1")
            if self.num:
                raise ValueError("SkipLayers: give num= or speedup=, not both")
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        bad = [x for x in layers if not isinstance(x, str) or not _NAME.match(x)]
        if bad:
            raise ValueError(f"SkipLayers.layers={self.layers!r}: each must be 'layers.<i>', 'layers.<i>.attn' "
                             f"or 'layers.<i>.ffn'; got {bad}")
        if layers and (self.num or self.speedup is not None):
            raise ValueError("SkipLayers: layers= is an explicit skip set; do not also give num= or speedup=")
        object.__setattr__(self, "layers", layers)

    @property
    def needs_calibration(self) -> bool:
        """Only data-driven choices need calibration (read by effcompile() and the cache key)."""
        chooses = self.num > 0 or self.speedup is not None
        return chooses and not self.layers and self.method != "uniform"


# ----------------------------------------------------------------------------- units in the graph
@dataclass
class Unit:
    """One skippable sublayer: its residual add; input/output are found when it is bypassed."""

    block: int
    part: str  # "attn" | "ffn"
    residual: fx.Node
    flops: float = 0.0
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"layers.{self.block}.{self.part}"


def find_units(gm: fx.GraphModule) -> tuple[dict[str, Unit], dict[str, str]]:
    """Skippable sublayers by name, and the sublayers that cannot be skipped with why."""
    residuals: dict[tuple[int, str], list[fx.Node]] = {}
    members: dict[tuple[int, str], list[fx.Node]] = {}
    for n in gm.graph.nodes:
        t = ir.sublayer(n)
        if t is None or t.block is None or t.part not in ("attn", "ffn") or n.op == "placeholder":
            continue
        members.setdefault((t.block, t.part), []).append(n)
        if t.kind == "residual":
            residuals.setdefault((t.block, t.part), []).append(n)
    units, why = {}, {}
    for key in sorted(members):
        name = f"layers.{key[0]}.{key[1]}"
        adds = residuals.get(key, [])
        if len(adds) != 1:
            why[name] = f"{len(adds)} residual adds (need exactly one to bypass it)"
            continue
        units[name] = Unit(key[0], key[1], adds[0], sum(_flops(n) for n in members[key]), members[key])
    return units, why


def _size(s) -> int:
    try:
        return int(s)
    except Exception:  # a symbolic size: its hint is the traced value
        return int(getattr(getattr(s, "node", None), "hint", None) or 1)


def _numel(v) -> int:
    return math.prod(_size(s) for s in v.shape) if isinstance(v, torch.Tensor) else 0


def _flops(n: fx.Node) -> float:
    """A rough cost of one node (for speedup targets): matmul FLOPs, or one per output element."""
    out = ir.tensor_val(n)
    if out is None or n.op != "call_function":
        return 0.0
    name = ir.target_name(n)
    if name in ("linear", "matmul", "bmm", "mm", "addmm") and len(n.args) >= 2:
        w = ir.tensor_val(n.args[1])
        k = _size(w.shape[-1] if name == "linear" else w.shape[-2]) if w is not None and w.dim() else 1
        return 2.0 * _numel(out) * k
    if name == "scaled_dot_product_attention":
        key = ir.tensor_val(n.args[1])
        return 4.0 * _numel(out) * (_size(key.shape[-2]) if key is not None else 1)
    return float(_numel(out))


def total_flops(gm: fx.GraphModule) -> float:
    return sum(_flops(n) for n in gm.graph.nodes)


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _ends(unit: Unit, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node]:
    """(stream input, unit output) now: the residual's earlier operand, and the last value of the unit
    (the residual add, or a post-norm after it as in BERT) that the rest of the graph reads."""
    r = unit.residual
    args = [a for a in r.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2:
        raise ValueError(f"{unit.name}: residual add {r.name} does not add two values")
    stream = min(args, key=order.__getitem__)
    key = (unit.block, unit.part)
    inside = {n for n in unit.nodes}
    closure, todo, out = {r}, [r], r
    while todo:
        n = todo.pop()
        for u in n.users:
            t = ir.sublayer(u)
            if u in inside and t is not None and (t.block, t.part) == key and u not in closure:
                closure.add(u)
                todo.append(u)
    live = [n for n in closure if any(u not in inside for u in n.users)]
    if live:
        out = max(live, key=order.__getitem__)
    return stream, out


def _impure(n: fx.Node) -> bool:
    # fx's is_impure() misses in-place method calls such as a cache's index_copy_ and add_.
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return n.is_impure() or (name.endswith("_") and not name.startswith("_")) or "out" in n.kwargs


def bypass(gm: fx.GraphModule, units: list[Unit]) -> dict[str, int]:
    """Rewrite ``gm`` so each unit's output is its input; erase what only the units computed.

    Side effects of a unit that read its computed values (KV-cache writes: the cache of a skipped
    attention is never read) go too; those that do not (cache-length counters) stay, so a cache's
    bookkeeping is the same as the full model's. Nothing outside the units' dead values is touched.
    Returns the nodes erased per unit.
    """
    removed: dict[str, int] = {}
    for unit in units:
        order = _order(gm)
        stream, out = _ends(unit, order)
        out.replace_all_uses_with(stream)
        inside = set(unit.nodes) & set(order)
        # Values that depend on the stream inside this unit: anything of them, side effect or not, goes.
        dep, todo = set(), [stream]
        while todo:
            n = todo.pop()
            for u in n.users:
                if u in inside and u not in dep:
                    dep.add(u)
                    todo.append(u)
        work = [out, *(n for n in dep if not n.users)]
        gone: set[fx.Node] = set()
        while work:
            n = work.pop()
            if n in gone or n.users or n.op in ("placeholder", "output") or (_impure(n) and n not in dep):
                continue
            inputs = n.all_input_nodes
            gm.graph.erase_node(n)
            gone.add(n)
            work.extend(inputs)
        removed[unit.name] = len(gone)
    gm.recompile()
    return removed


def _erase_dead(gm: fx.GraphModule, *, keep_impure: bool = True) -> int:
    """Erase values nothing reads, keeping side effects (fx's own DCE drops in-place cache writes)."""
    count, changed = 0, True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n.op in ("placeholder", "output") or n.users or (keep_impure and _impure(n)):
                continue
            gm.graph.erase_node(n)
            count, changed = count + 1, True
    gm.recompile()
    return count


def still_computed(gm: fx.GraphModule, units: list[Unit]) -> dict[str, int]:
    """Compute nodes of bypassed units that survive because the graph returns them (e.g. a KV cache)."""
    alive = set(gm.graph.nodes)
    out = {}
    for u in units:
        n = sum(1 for x in u.nodes if x in alive and x.op == "call_function" and ir.target_name(x) in ("linear", "matmul"))
        if n:
            out[u.name] = n
    return out


# ----------------------------------------------------------------------------- candidates and scores
def candidates(units: dict[str, Unit], unit: str) -> dict[str, list[str]]:
    """Candidate name -> the sublayer names it removes, in graph order."""
    blocks = sorted({u.block for u in units.values()})
    if unit == "block":
        return {f"layers.{b}": [f"layers.{b}.{p}" for p in ("attn", "ffn") if f"layers.{b}.{p}" in units]
                for b in blocks if f"layers.{b}.attn" in units or f"layers.{b}.ffn" in units}
    parts = ("attn", "ffn") if unit == "sublayer" else (unit,)
    return {f"layers.{b}.{p}": [f"layers.{b}.{p}"] for b in blocks for p in parts if f"layers.{b}.{p}" in units}


def _expand(names: tuple[str, ...], units: dict[str, Unit], why: dict[str, str]) -> list[str]:
    blocks = sorted({u.block for u in units.values()} | {int(k.split(".")[1]) for k in why})
    valid = [f"layers.{b}" for b in blocks] + sorted(units, key=lambda k: (units[k].block, k))
    out = []
    for name in names:
        parts = [name] if name.count(".") == 2 else [f"{name}.attn", f"{name}.ffn"]
        found = [p for p in parts if p in units]
        blocked = [p for p in parts if p in why]
        if blocked:
            raise ValueError(f"SkipLayers.layers: {name!r} cannot be skipped ({why[blocked[0]]})")
        if not found:
            raise ValueError(f"SkipLayers.layers: unknown layer {name!r}; valid: {valid}")
        out += [p for p in found if p not in out]
    return out


def uniform_order(names: list[str], k: int) -> list[str]:
    """k of ``names`` evenly spaced, never the first (Unified Layer Skipping spreads skips out)."""
    n = len(names)
    return [names[(i + 1) * n // (k + 1)] for i in range(k)]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[str]):
        super().__init__(gm)
        self.watch, self.got = watch, {}

    def run_node(self, n):
        v = super().run_node(n)
        if n.name in self.watch:
            self.got[n.name] = v
        return v


@torch.no_grad()
def _run(gm: fx.GraphModule, batches: list, watch: set[str] | None = None):
    """Outputs (flattened tensors) per batch, and the watched nodes' values per batch."""
    outs, seen = [], []
    for args in batches:
        rec = _Recorder(gm, watch) if watch else None
        res = rec.run(*args) if rec else gm(*args)
        got = rec.got if rec else {}
        outs.append([t for t in _flatten(res) if isinstance(t, torch.Tensor) and t.is_floating_point()])
        seen.append(got)
    return outs, seen


def _flatten(x):
    if isinstance(x, list | tuple):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8).mean().item()


def output_change(ref: list, out: list) -> float:
    """Mean over batches and outputs of 1 - cosine (rows of the last dim) against the reference."""
    vals = [1.0 - _cos(r, o) for rb, ob in zip(ref, out, strict=True) for r, o in zip(rb, ob, strict=True)]
    return sum(vals) / max(len(vals), 1)


def cosine_scores(gm: fx.GraphModule, units: dict[str, Unit], cands: dict[str, list[str]],
                  batches: list) -> dict[str, float]:
    """Importance = 1 - cos(candidate input, candidate output), mean over calibration tokens."""
    order = _order(gm)
    ends = {name: _ends(units[name], order) for name in units}
    io = {c: (ends[subs[0]][0].name, ends[subs[-1]][1].name) for c, subs in cands.items()}
    _, seen = _run(gm, batches, {x for pair in io.values() for x in pair})
    return {c: sum(1.0 - _cos(s[i], s[o]) for s in seen) / len(seen) for c, (i, o) in io.items()}


def _trial(gm: fx.GraphModule, units: dict[str, Unit], subs: list[str]) -> fx.GraphModule:
    g = ir.copy_graph_module(gm)
    ir.tag_sublayers(g)
    u2, _ = find_units(g)
    bypass(g, [u2[s] for s in subs])
    return g


def greedy_order(gm, units, cands, batches, k: int, stop=None) -> tuple[list[str], dict[str, float]]:
    """FinerCut: repeatedly remove the candidate whose removal changes the outputs least."""
    ref, _ = _run(gm, batches)
    chosen, scores = [], {}
    while len(chosen) < k and (stop is None or not stop(chosen)):
        trials = {}
        for c in cands:
            if c in chosen:
                continue
            subs = [s for x in [*chosen, c] for s in cands[x]]
            trials[c] = output_change(ref, _run(_trial(gm, units, subs), batches)[0])
        best = min(trials, key=trials.get)
        chosen.append(best)
        scores[best] = trials[best]
    return chosen, scores


# ----------------------------------------------------------------------------- the pass
def _estimated_speedup(total: float, units: dict[str, Unit], subs: list[str]) -> float:
    cut = sum(units[s].flops for s in subs)
    return total / max(total - cut, 1e-9)


@register_pass(SkipLayers, phase="semantic")
def skip_layers(gm: fx.GraphModule, cfg: SkipLayers, ctx: PassContext) -> PassResult:
    """Choose the skip set (explicitly, uniformly or from calibration) and bypass it."""
    units, why = find_units(gm)
    unskippable = "; ".join(f"{k}: {v}" for k, v in why.items())
    if not cfg.layers and cfg.num == 0 and cfg.speedup is None:
        return PassResult(modified=False, note="num=0: nothing to skip")
    if not units:
        return PassResult(modified=False, note="no skippable sublayers (no residual adds tagged attn/ffn)"
                          + (f": {unskippable}" if unskippable else ""))
    total = total_flops(gm)
    cands = candidates(units, cfg.unit)
    scores: dict[str, float] = {}
    if cfg.layers:
        subs = _expand(cfg.layers, units, why)
        chosen, method = list(cfg.layers), "explicit"
    else:
        method, names = cfg.method, list(cands)
        limit = len(names) - 1
        if cfg.num > limit:
            raise ValueError(f"SkipLayers.num={cfg.num} would remove every {cfg.unit} unit of this model "
                             f"({len(names)}: {names}); valid: 0..{limit}")
        if cfg.speedup is not None:
            def enough(ch):
                return _estimated_speedup(total, units, [s for c in ch for s in cands[c]]) >= cfg.speedup
        else:
            enough = None
        k = cfg.num if cfg.speedup is None else limit
        batches = list(ctx.calibration or [])
        if method != "uniform" and not batches:
            raise ValueError(f"SkipLayers(method={method!r}) needs calibration data: "
                             "effcompile(model, calibration=[batch, ...])")
        if method == "uniform":
            sizes = range(1, k + 1) if enough else [k]
            chosen = next((uniform_order(names, j) for j in sizes if not enough or enough(uniform_order(names, j))),
                          uniform_order(names, k))
        elif method == "cosine":
            scores = cosine_scores(gm, units, cands, batches)
            ranked = sorted(names, key=lambda c: scores[c])
            chosen = []
            for c in ranked[:k]:
                if enough and enough(chosen):
                    break
                chosen.append(c)
        else:
            chosen, scores = greedy_order(gm, units, cands, batches, k, stop=enough)
        subs = [s for c in chosen for s in cands[c]]
    if set(subs) == set(units):
        raise ValueError(f"SkipLayers would remove every sublayer of this model ({sorted(units)}): keep at least one")
    removed = bypass(gm, [units[s] for s in subs])
    kept = still_computed(gm, [units[s] for s in subs])
    est = _estimated_speedup(total, units, subs)
    artifacts = {"method": method, "unit": cfg.unit, "skipped": chosen, "sublayers": subs,
                 "scores": {k: round(v, 6) for k, v in scores.items()},
                 "estimated_speedup": round(est, 4), "nodes_removed": removed}
    if unskippable:
        artifacts["unskippable"] = why
    note = f"skip set by {method}: {', '.join(chosen)} (est. {est:.2f}x by FLOPs)"
    if kept:
        artifacts["kept_matmuls"] = kept
        note += ("; still computed because the graph returns their values (e.g. a KV cache): "
                 + ", ".join(f"{k} {v} matmuls" for k, v in kept.items()))
    if unskippable:
        note += f"; not skippable: {unskippable}"
    return PassResult(modified=True, count=len(subs), where=subs, artifacts=artifacts, note=note)
