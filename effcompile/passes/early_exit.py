"""Dynamic early exit: the graph becomes partitions between exit points, run by a host-side scheduler."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes.skip_layers import _ends, _impure, _order, find_units

RULES = ("confidence", "saturation")
GRANULARITIES = ("batch", "sequence")


@dataclass(frozen=True)
class EarlyExit(PassConfig):
    """Exit after block ``e`` (for ``e`` in ``exits``) when the exit rule holds, through the model's own
    final norm and head (or pooler).

    rule: "confidence" - max softmax probability of the first output (logits) at the last position;
    "saturation" - cosine between the residual stream here and at the previous exit point (the
    embeddings for the first), mean over tokens. Exit when the score >= ``threshold`` (> 1: never).
    granularity: "batch" - the batch exits when every row qualifies (one depth per call, SkipDecode
    style); "sequence" - each row takes its outputs from its own first qualifying exit, compute stops
    when every row has exited. Layers past the exit get their KV cache filled from the exit's hidden
    state (CALM's state propagation), so later tokens attend to a consistent cache.
    """

    exits: tuple[int, ...] = ()  # block indices; () = after every block but the last
    rule: str = "confidence"
    threshold: float = 0.9
    granularity: str = "batch"
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        exits = (self.exits,) if isinstance(self.exits, int) else tuple(self.exits)
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in exits):
            raise ValueError(f"EarlyExit.exits={self.exits!r}: block indices (ints >= 0) after which to exit")
        object.__setattr__(self, "exits", tuple(sorted(set(exits))))
        if self.rule not in RULES:
            raise ValueError(f"EarlyExit.rule={self.rule!r} is not supported; valid: {list(RULES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"EarlyExit.granularity={self.granularity!r} is not supported; valid: {list(GRANULARITIES)}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) or self.threshold < 0:
            raise ValueError(f"EarlyExit.threshold={self.threshold!r}: a number >= 0 (> 1 never exits)")


# ----------------------------------------------------------------------------- partitions
def _subgraph(nodes: list[fx.Node], outputs: list[fx.Node], owner: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule computing ``outputs`` from ``nodes``; its inputs (by original name) are returned too."""
    g, env, inputs = fx.Graph(), {}, []
    inside = set(nodes)

    def arg(n: fx.Node):
        if n not in env:
            if n in inside:
                raise RuntimeError(f"{n.name} used before it is computed")
            env[n] = g.placeholder(n.name)
            env[n].meta.update(n.meta)
            inputs.append(n.name)
        return env[n]

    for n in nodes:
        for a in n.all_input_nodes:
            arg(a)
        env[n] = g.node_copy(n, arg)
    g.output(tuple(arg(o) for o in outputs))  # an output computed earlier passes through
    return fx.GraphModule(owner, g), inputs


@dataclass
class _Part:
    gm: fx.GraphModule
    inputs: list[str]
    outputs: list[str]

    def __call__(self, env: dict[str, Any]) -> None:
        env.update(zip(self.outputs, self.gm(*[env[n] for n in self.inputs]), strict=True))


class ExitScheduler(torch.nn.Module):
    """Host side: run partition after partition; at each exit point score the rule on the exit head's
    outputs and stop when it holds. Thresholds live here, not in the graph, so no depth recompiles."""

    def __init__(self, placeholders, parts, heads, fills, exits, streams, outputs, cfg: EarlyExit):
        super().__init__()
        self.placeholders = placeholders
        self.parts = parts  # parts[i] ends at exits[i]; the last one runs to the model's outputs
        self.heads = heads  # pure: final norm + head on the stream at exits[i]
        self.fills = fills  # the whole tail (head + the skipped layers' KV writes), run on exit; None if pure
        self.exits = exits
        self.streams = streams  # the residual stream at each exit point, and (last) at the first block's input
        self.outputs = outputs
        self.cfg = cfg
        self.threshold = float(cfg.threshold)  # retunable at run time: the graph does not depend on it
        self.scored = 0  # which output holds the logits (set by the pass from the graph's metadata)
        self.counts: dict[str, int] = {}  # rows that exited after block e (or ran in "full")
        # The partitions' GraphModules as submodules: they share the original graph's parameters.
        self.graphs = torch.nn.ModuleList([p.gm for p in [*parts, *heads, *(f for f in fills if f is not None)]])

    def _score(self, env, outs, i) -> torch.Tensor:
        if self.cfg.rule == "confidence":
            logits = outs[self.scored].float()
            return logits.reshape(logits.shape[0], -1, logits.shape[-1])[:, -1].softmax(-1).amax(-1)
        prev = env[self.streams[i - 1]] if i > 0 else env[self.streams[-1]]
        cos = F.cosine_similarity(env[self.streams[i]].float(), prev.float(), dim=-1)
        return cos.reshape(cos.shape[0], -1).mean(-1)

    def forward(self, *args):
        env = dict(zip(self.placeholders, args, strict=True))
        result, done = None, None
        for i, part in enumerate(self.parts):
            part(env)
            if i == len(self.exits):
                break
            if self.threshold > 1:
                continue  # never exits: no exit head is evaluated
            heads_env = dict(env)
            self.heads[i](heads_env)
            outs = [heads_env[o] for o in self.heads[i].outputs]
            ok = self._score(env, outs, i) >= self.threshold
            if self.cfg.granularity == "batch":
                ok = ok.all().expand_as(ok)
            new = ok if done is None else ok & ~done
            final = bool((new if done is None else done | new).all())
            if final and self.fills[i] is not None:
                # Exiting for good: run the whole tail once, so its side effects (the skipped layers'
                # KV, written from the exit state) and its outputs (e.g. a cache it allocates) agree.
                tail_env = dict(env)
                self.fills[i](tail_env)
                outs = [tail_env[o] for o in self.fills[i].outputs]
            if new.any():
                result = outs if result is None else [
                    torch.where(_rows(new, r), o, r) if _batched(o, new) else r for o, r in zip(outs, result, strict=True)]
                done = new if done is None else done | new
                self.counts[f"layers.{self.exits[i]}"] = self.counts.get(f"layers.{self.exits[i]}", 0) + int(new.sum())
            if final:
                return tuple(result)
        outs = [env[o] for o in self.outputs]
        rest = int((~done).sum()) if done is not None else _rows_of(outs)
        self.counts["full"] = self.counts.get("full", 0) + rest
        if result is None:
            return tuple(outs)
        return tuple(torch.where(_rows(done, r), r, o) if _batched(o, done) else o
                     for o, r in zip(outs, result, strict=True))


def _batched(t, mask) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == mask.shape[0]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _rows_of(outs) -> int:
    t = next((o for o in outs if isinstance(o, torch.Tensor) and o.dim()), None)
    return int(t.shape[0]) if t is not None else 1


def _tail(gm: fx.GraphModule, e: int, boundary: str) -> tuple[list[fx.Node], list[fx.Node], fx.GraphModule]:
    """A copy of ``gm`` whose blocks after ``e`` are bypassed but keep their side effects (their KV writes
    now read the exit state); returns its nodes after the boundary: pure ones, side-effect ones."""
    from effcompile.passes import skip_layers as sk

    g = ir.copy_graph_module(gm)
    ir.tag_sublayers(g)
    units, _ = find_units(g)
    later = [u for u in units.values() if u.block > e]
    for u in later:
        order = _order(g)
        stream, out = _ends(u, order)
        out.replace_all_uses_with(stream)
    sk._erase_dead(g, keep_impure=True)
    nodes = list(g.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if n.name == boundary)
    after = [n for n in nodes[cut + 1:] if n.op not in ("placeholder", "output")]
    impure = {n for n in after if _impure(n)}
    need, todo = set(), list(impure)
    while todo:  # what the side effects read
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in set(after) and a not in need:
                need.add(a)
                todo.append(a)
    fill = [n for n in after if n in impure or n in need]
    pure = [n for n in after if n not in impure]
    return pure, fill, g


@register_pass(EarlyExit, phase="semantic", invalidates=())
def early_exit(gm: fx.GraphModule, cfg: EarlyExit, ctx: PassContext) -> PassResult:
    """Split the graph at the exit points and hand it to an :class:`ExitScheduler`."""
    units, _ = find_units(gm)
    blocks = sorted({u.block for u in units.values()})
    if len(blocks) < 2:
        return PassResult(modified=False, note=f"{len(blocks)} skippable block(s): nothing to exit early from")
    exits = list(cfg.exits) or blocks[:-1]
    bad = [e for e in exits if e not in blocks[:-1]]
    if bad:
        raise ValueError(f"EarlyExit.exits={list(cfg.exits)}: {bad} not an exit point of this model; valid: "
                         f"{blocks[:-1]} (after the last block, layers.{blocks[-1]}, is the full model)")
    nodes = list(gm.graph.nodes)
    order = _order(gm)
    out_node = nodes[-1]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    boundary = {}
    for e in exits:  # the stream after block e: the output of its last unit
        last = max((u for u in units.values() if u.block == e), key=lambda u: order[u.residual])
        boundary[e] = _ends(last, order)[1]
    first = min(units.values(), key=lambda u: order[u.residual])
    entry = _ends(first, order)[0]
    cuts = [order[boundary[e]] for e in exits]
    groups, start = [], 0
    for c in [*cuts, len(nodes)]:
        groups.append([n for n in body if start <= order[n] <= c])
        start = c + 1
    tails = [_tail(gm, e, boundary[e].name) for e in exits]
    outputs = [a for a in out_node.all_input_nodes]
    # Each partition returns what later partitions, the exit heads/fills and the scheduler read.
    later_need: set[str] = {n.name for n in outputs} | {boundary[e].name for e in exits} | {entry.name}
    for pure, fill, _ in tails:
        for n in pure + fill:
            later_need |= {a.name for a in n.all_input_nodes}
    parts = []
    for i, grp in enumerate(groups):
        rest = {a.name for g in groups[i + 1:] for n in g for a in n.all_input_nodes}
        outs = [n for n in grp if n.name in rest | later_need]
        sub, ins = _subgraph(grp, outs, gm)
        parts.append(_Part(sub, ins, [n.name for n in outs]))
    heads, fills = [], []
    for pure, fill, g in tails:
        outs_g = [n for n in g.graph.nodes if n.op == "output"][0].all_input_nodes
        sub, ins = _subgraph(pure, outs_g, g)
        sub.graph.eliminate_dead_code()  # pure: what only the KV fill reads is not computed here
        sub.recompile()
        heads.append(_Part(sub, ins, [n.name for n in outs_g]))
        if fill:
            sub, ins = _subgraph([n for n in g.graph.nodes if n in set(pure) | set(fill)], outs_g, g)
            fills.append(_Part(sub, ins, [n.name for n in outs_g]))
        else:
            fills.append(None)
    placeholders = [n.name for n in nodes if n.op == "placeholder"]
    sched = ExitScheduler(placeholders, parts, heads, fills, exits, [boundary[e].name for e in exits] + [entry.name],
                          [n.name for n in outputs], cfg)
    floats = [i for i, o in enumerate(outputs) if (v := ir.tensor_val(o)) is not None and v.is_floating_point()
              and v.dim() >= 2]
    if not floats:
        raise ValueError("EarlyExit: the model returns no float tensor of rank >= 2 to score; valid rules need logits "
                         "(confidence) or a hidden state (saturation)")
    sched.scored = floats[0]
    _rewrite(gm, sched, outputs, out_node)
    where = [f"layers.{e}" for e in exits]
    kv = sum(1 for f in fills if f is not None)
    note = (f"{len(parts)} partitions, exits after {', '.join(where)} by {cfg.rule} >= {cfg.threshold} "
            f"({cfg.granularity})" + (f"; KV of skipped layers filled from the exit state at {kv} exit(s)" if kv else ""))
    return PassResult(modified=True, count=len(exits), where=where, note=note,
                      artifacts={"exits": where, "rule": cfg.rule, "threshold": cfg.threshold,
                                 "granularity": cfg.granularity, "partitions": len(parts), "kv_fill": kv})


def _run_scheduler(sched, *args):
    return sched(*args)


def _rewrite(gm: fx.GraphModule, sched: ExitScheduler, outputs: list[fx.Node], out_node: fx.Node) -> None:
    """Replace the body by one scheduler call whose results feed the original output structure."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    gm.add_submodule("_ec_early_exit", sched)
    with g.inserting_before(out_node):
        ref = g.get_attr("_ec_early_exit")
        ref.meta[ir.VAL], ref.meta[ir.TAG] = None, ir.Sublayer("other")
        call = g.call_function(_run_scheduler, (ref, *placeholders))
        call.meta[ir.VAL] = tuple(ir.node_val(o) for o in outputs)
        call.meta[ir.TAG] = ir.Sublayer("other")
        repl = {}
        for i, o in enumerate(outputs):
            item = g.call_function(operator.getitem, (call, i))
            item.meta[ir.VAL] = ir.node_val(o)
            item.meta[ir.TAG] = ir.Sublayer("head")
            repl[o] = item
    out_node.args = fx.node.map_arg(out_node.args, lambda n: repl.get(n, n))
    for n in reversed(list(g.nodes)):
        if n.op not in ("placeholder", "output") and n not in (call, ref) and not n.users and n not in repl.values():
            g.erase_node(n)
    gm.recompile()
