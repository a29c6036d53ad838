"""Token merging (ToMe) for encoders: bipartite soft matching between attention and MLP, unmerged at the exit."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes import token_graph as tg

SCHEDULES = ("constant", "decreasing")


@dataclass(frozen=True)
class MergeTokens(PassConfig):
    """Merge similar tokens (ToMe) after the attention of chosen encoder layers.

    ratio: fraction of the tokens gone by the last layer (0 = none), spread over ``layers`` by ``schedule``
    ("constant": the same r every layer, as ToMe; "decreasing": more merges in early layers).
    r: tokens merged per layer instead of ratio: an int for every layer or one int per layer.
    layers: block indices that merge (default: all). protect_first: never merge token 0 (CLS).
    Merged tokens carry a size; attention adds log(size) to their keys (proportional attention), padding
    has size 0 (so it is masked exactly as before), and outputs are unmerged back to [B, S, H].
    """

    ratio: float = 0.0
    r: int | tuple[int, ...] | None = None
    schedule: str = "constant"
    layers: tuple[int, ...] | None = None
    protect_first: bool = True
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"MergeTokens.ratio={self.ratio!r}: must be a number in [0, 1) "
                             f"(the fraction of tokens gone by the last layer; 0 = none)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"MergeTokens.schedule={self.schedule!r}: valid values are {list(SCHEDULES)}")
        if self.r is not None:
            rs = (self.r,) if isinstance(self.r, int) else tuple(self.r)
            if not rs or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in rs):
                raise ValueError(f"MergeTokens.r={self.r!r}: must be an int >= 0 or a tuple of them (tokens merged "
                                 f"per layer)")
            if self.ratio:
                raise ValueError(f"MergeTokens: give ratio or r, not both (ratio={self.ratio}, r={self.r})")
            object.__setattr__(self, "r", self.r if isinstance(self.r, int) else rs)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
                raise ValueError(f"MergeTokens.layers={self.layers!r}: must be block indices >= 0")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))


# ---------------------------------------------------------------------------------------------
# The ops the pass inserts (plain torch functions: fake-tensor propagation traces them, the cache
# stores them by their importable name).
# ---------------------------------------------------------------------------------------------


def tome_init(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(size [B, S] float, source map [B, S] int64) for the stream x [B, S, C] and the attention mask.

    Padding gets size 0: log(0) = -inf is then exactly the padding mask, and a padded token adds
    nothing to whatever it is merged with.
    """
    b, s = x.shape[0], x.shape[1]
    valid = tg.key_validity(mask, b, s, x.device)
    src = torch.arange(s, device=x.device).expand(b, s)
    return valid.to(x.dtype), src


def tome_merge(x: torch.Tensor, k: torch.Tensor, size: torch.Tensor, src: torch.Tensor, r: int,
               protect_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching (ToMe): merge r tokens of set A (even) into their most similar of set B (odd).

    x [B, N, C] stream, k [B, heads, N, d] this layer's attention keys (per-head cosine, averaged),
    size [B, N], src [B, S0] original token -> current index. Returns (x, size, src) with N - r tokens.
    """
    # Similarity: the cosine of two tokens' keys in each head, averaged over heads. ToMe's timm code
    # averages the keys over heads first; on MiniLM that mixes unrelated heads' dimensions and picks
    # worse pairs (benchmarks/tokens.py: 0.936 vs 0.974 mean cosine at ratio 0.5 on 128-token text).
    kf = k.float()
    unit = kf * torch.rsqrt((kf * kf).sum(-1, keepdim=True).clamp_min(1e-24))
    scores = (unit[:, :, ::2] @ unit[:, :, 1::2].transpose(-1, -2)).mean(1)  # [B, Na, Nb], in [-1, 1]
    va, vb = size[:, ::2] > 0, size[:, 1::2] > 0
    # A padded token merges for free (size 0): first choice. A real one never merges into padding
    # (two real tokens would then average without a similarity check).
    pad_a = (~va)[:, :, None].expand_as(scores)
    scores = torch.where(pad_a, 2.0, torch.where(vb[:, None, :], scores, float("-inf")))
    if protect_first:
        scores[:, 0, :] = float("-inf")
    node_max, node_idx = scores.max(-1)
    edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    unm_idx = edge_idx[:, r:].sort(-1).values  # kept A tokens, in their original order
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(-1, src_idx)
    bsz, n, c = x.shape
    na, nb = scores.shape[1], scores.shape[2]
    n_unm = na - r

    # The merged stream: kept A tokens in order, then every B token. One row gather of the whole stream
    # (index_select on [B*N, C] copies rows; gather with an expanded index would index every element);
    # only the r merged pairs do arithmetic (a token nothing merged into is copied bit for bit).
    base = (torch.arange(bsz, device=x.device) * n)[:, None]
    b_pos = (2 * torch.arange(nb, device=x.device) + 1).expand(bsz, nb)
    flat = x.reshape(bsz * n, c)
    out = flat.index_select(0, (torch.cat([2 * unm_idx, b_pos], 1) + base).flatten())
    sa, sb = size[:, ::2], size[:, 1::2]
    s_src = sa.gather(1, src_idx)
    size_b = sb.scatter_add(1, dst_idx, s_src)
    new_size = torch.cat([sa.gather(1, unm_idx), size_b], 1)
    # Each destination becomes (x_b * s_b + sum x_a * s_a) / (s_b + sum s_a): written as x_b's share,
    # then each merged A token's share added (duplicate destinations write the same first term).
    s_dst = size_b.gather(1, dst_idx).clamp_min(1e-6)
    rows = (n_unm + dst_idx + (torch.arange(bsz, device=x.device) * (n - r))[:, None]).flatten()
    x_dst = flat.index_select(0, (2 * dst_idx + 1 + base).flatten())
    x_src = flat.index_select(0, (2 * src_idx + base).flatten())
    w_dst = (sb.gather(1, dst_idx) / s_dst).flatten()[:, None].to(x.dtype)
    w_src = (s_src / s_dst).flatten()[:, None].to(x.dtype)
    out.index_copy_(0, rows, x_dst * w_dst)
    out.index_add_(0, rows, x_src * w_src)
    out = out.view(bsz, n - r, c)

    # Where each current token went: kept A tokens to their rank, merged ones to their B partner.
    new_a = torch.empty_like(node_idx)
    new_a.scatter_(1, unm_idx, torch.arange(n_unm, device=x.device).expand(bsz, n_unm))
    new_a.scatter_(1, src_idx, n_unm + dst_idx)
    where = torch.empty(bsz, n, dtype=src.dtype, device=x.device)
    where[:, ::2] = new_a
    where[:, 1::2] = n_unm + torch.arange(nb, device=x.device)
    return out, new_size, where.gather(1, src)


@torch.library.custom_op("effcompile::tome_merge", mutates_args=())
def tome_merge_op(x: torch.Tensor, k: torch.Tensor, size: torch.Tensor, src: torch.Tensor, r: int,
                  protect_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tome_merge as one opaque graph op (the cache stores it by name, codegen leaves it alone)."""
    return tome_merge(x, k, size, src, r, protect_first)


@tome_merge_op.register_fake
def _(x, k, size, src, r, protect_first):
    # Shapes straight from n - r: tracing the matching itself under symbolic shapes would add guards
    # (parity of n, which of two counts is smaller) and recompile dynamo's graph per length.
    n = x.shape[1] - r
    return x.new_empty(x.shape[0], n, x.shape[2]), size.new_empty(size.shape[0], n), torch.empty_like(src)


def tome_bias(size: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Proportional attention: log(size) added to every query's score for each key, [B, 1, 1, N]."""
    return size.log().to(q.dtype)[:, None, None, :]


def tome_unmerge(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Every original token reads the merged token it went into: [B, N, ...] -> [B, S0, ...]."""
    b, n = x.shape[0], x.shape[1]
    rows = (src + (torch.arange(b, device=x.device) * n)[:, None]).flatten()
    return x.reshape(b * n, -1).index_select(0, rows).view(*src.shape, *x.shape[2:])


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


MAX_LAYER_FRACTION = 0.45  # bipartite matching merges at most half a layer's tokens; stay clear of it


def tome_plan(s, gone: tuple[int, ...] | None, fixed: tuple[int, ...] | None) -> tuple:
    """(r per layer..., tokens after each layer...) for sequence length ``s``: an int, or a SymInt in a
    dynamic graph. Each count is a closed form of s (s - round(s * gone_j / 10000), or s minus a
    constant), never nested through earlier layers, so symbolic shapes stay small expressions.
    """
    if fixed is not None:
        ns, acc = [], 0
        for r in fixed:
            acc += r
            ns.append(s - acc)
    else:
        ns = [s - (s * c + 5000) // 10000 for c in gone]
    rs = [prev - n for prev, n in zip([s, *ns[:-1]], ns, strict=True)]
    return (*rs, *ns)


def _plan_args(cfg: MergeTokens, layers: list[int], s) -> tuple[tuple, str]:
    """(tome_plan's gone/fixed arguments, a note when the schedule had to be capped)."""
    if cfg.r is not None:
        fixed = (cfg.r,) * len(layers) if isinstance(cfg.r, int) else cfg.r
        if len(fixed) != len(layers):
            raise ValueError(f"MergeTokens.r has {len(fixed)} entries but {len(layers)} layers merge ({layers})")
        if isinstance(s, int):  # cap each layer at what bipartite matching can merge
            capped, n = [], s
            for r in fixed:
                r = max(0, min(r, (n - int(cfg.protect_first)) // 2))
                capped.append(r)
                n -= r
            note = "" if tuple(capped) == tuple(fixed) else (
                f"r={list(fixed)} capped to {capped} at S={s} (a layer merges at most half its tokens)")
            return (None, tuple(capped)), note
        return (None, tuple(fixed)), ""
    w = [1.0] * len(layers) if cfg.schedule == "constant" else [float(len(layers) - i) for i in range(len(layers))]
    left, gone, cum, capped = 1.0, [], 0.0, False
    for x in w:
        take = cfg.ratio * x / sum(w)
        if take > MAX_LAYER_FRACTION * left:
            take, capped = MAX_LAYER_FRACTION * left, True
        left -= take
        cum += take
        gone.append(round(cum * 10000))
    note = (f"ratio={cfg.ratio} capped to {1 - left:.3f} (a layer merges at most {MAX_LAYER_FRACTION:.0%} of "
            f"its tokens)") if capped else ""
    return (tuple(gone), None), note


@register_pass(MergeTokens, phase="semantic")
def merge_tokens(gm: fx.GraphModule, cfg: MergeTokens, ctx: PassContext) -> PassResult:
    """Insert ToMe merges after the attention of each chosen layer; unmerge where the stream leaves the blocks."""
    if cfg.ratio == 0 and (cfg.r is None or cfg.r == 0 or (isinstance(cfg.r, tuple) and not any(cfg.r))):
        return PassResult(modified=False, note="ratio=0: nothing to merge")
    model = tg.find_layers(gm, "MergeTokens")
    layers = list(cfg.layers) if cfg.layers is not None else list(model.blocks)
    bad = [i for i in layers if i not in model.blocks]
    if bad:
        raise ValueError(f"MergeTokens.layers={list(cfg.layers)}: block(s) {bad} do not exist; the model has "
                         f"blocks {list(model.blocks)}")
    causal = [i for i in layers if model.blocks[i].causal]
    if causal:
        raise ValueError(f"MergeTokens needs bidirectional (encoder) attention; layers {causal} are causal. "
                         f"Use PruneTokens for decoders")
    s_old = model.seq_len
    plan_args, cap_note = _plan_args(cfg, layers, s_old)
    work = ir.copy_graph_module(gm)
    wmodel = tg.find_layers(work, "MergeTokens")
    g = work.graph
    first = wmodel.blocks[layers[0]]
    nl = len(layers)
    if isinstance(s_old, int):
        counts = tome_plan(s_old, *plan_args)
        rs, ns = list(counts[:nl]), list(counts[nl:])
        if not any(rs):
            return PassResult(modified=False, note=f"no layer merges any token at S={s_old}")
    else:
        # A dynamic graph: the counts are computed from the sequence length at run time, so one
        # compiled graph serves every length (no recompile per value).
        seq = tg.sym_node(work, s_old)
        if seq is None:
            return PassResult(modified=False, note=f"sequence length {s_old} is symbolic and no graph value holds it")
        counts = tg.insert_after(g, seq, tome_plan, (seq, *plan_args))
        rs, ns, anchor = [], [], counts
        for j in range(2 * nl):
            anchor = tg.insert_after(g, anchor, operator.getitem, (counts, j))
            (rs if j < nl else ns).append(anchor)
    plan = list(zip(layers, rs, strict=True))
    lengths = dict(zip(layers, ns, strict=True))
    plan = [(i, r) for i, r in plan if not isinstance(r, int) or r > 0]

    # size/src start from the first merging layer's stream and attention mask.
    init = tg.insert_after(g, first.mid, tome_init, (first.mid, first.mask))
    size = tg.insert_after(g, init, operator.getitem, (init, 0))
    src = tg.insert_after(g, size, operator.getitem, (init, 1))
    stage_of: dict[fx.Node, int] = {}
    stage_len = [s_old]
    biases: dict[int, fx.Node] = {}
    srcs: dict[int, fx.Node] = {}
    ours = {init, size, src}
    for stage, (i, r) in enumerate(plan, start=1):
        blk = wmodel.blocks[i]
        users = [u for u in blk.mid.users if u not in ours]
        anchor = src if stage == 1 else blk.mid
        merged = tg.insert_after(g, anchor, torch.ops.effcompile.tome_merge.default, (blk.mid, blk.k, size, src, r, cfg.protect_first))
        x = tg.insert_after(g, merged, operator.getitem, (merged, 0))
        size = tg.insert_after(g, x, operator.getitem, (merged, 1))
        src = tg.insert_after(g, size, operator.getitem, (merged, 2))
        for u in users:
            u.replace_input_with(blk.mid, x)
        ours |= {merged, x, size, src}
        stage_len.append(lengths[i])
        for m in (merged, x, size, src):
            stage_of[m] = stage
        stage_of[x] = stage
        biases[stage] = size
        srcs[stage] = src


    def on_sdpa(node: fx.Node, stage: int) -> None:
        q = node.args[0]
        with g.inserting_before(node):
            bias = g.call_function(tome_bias, (biases[stage], q))
        tg.set_sdpa_mask(node, bias)
        ours.add(bias)

    def on_exit(value: fx.Node, stage: int, consumer: fx.Node) -> fx.Node:
        with g.inserting_before(consumer):
            return g.call_function(tome_unmerge, (value, srcs[stage]))

    try:
        tg.retarget_downstream(work, stage_of, stage_len, ours, on_sdpa=on_sdpa, on_exit=on_exit,
                               on_foreign=None)
    except tg.Refuse as e:
        return PassResult(modified=False, note=f"not applied: {e}")
    tg.adopt(gm, work)
    where = [f"layers.{i}.attn" for i, _ in plan]
    artifacts = {"seq_len": str(s_old), "schedule": cfg.schedule if cfg.r is None else "r",
                 "ratio": cfg.ratio, "layers": [i for i, _ in plan]}
    if isinstance(s_old, int):
        artifacts.update({"r_per_layer": {f"layers.{i}": r for i, r in plan},
                          "tokens_after_layer": {f"layers.{i}": lengths[i] for i, _ in plan},
                          "fraction_gone": round(1 - stage_len[-1] / s_old, 4)})
    else:
        artifacts["counts"] = "computed from the sequence length at run time (dynamic graph)"
    return PassResult(modified=True, count=len(plan), where=where, artifacts=artifacts, note=cap_note)

