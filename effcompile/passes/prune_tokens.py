"""Token pruning for decoder prefill (FastV / GemFilter / LazyLLM): keep the most-attended tokens from layer K on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes import token_graph as tg

METHODS = ("received", "last")  # FastV: attention received from every query; GemFilter: from the last query


@dataclass(frozen=True)
class PruneTokens(PassConfig):
    """Keep the ``keep_ratio`` most important prompt tokens from block ``layer`` on (prefill).

    Importance is the attention of block ``layer - 1`` (the last block that sees every token):
    ``method="received"`` averages what each key receives over all queries and heads (FastV),
    ``"last"`` takes the last query's attention (GemFilter). ``progressive=True`` prunes again at every
    later block, shrinking geometrically to keep_ratio at the last one (LazyLLM-style). The last token
    is always kept; kept tokens keep their original positions (RoPE), so the KV cache of later blocks
    holds only kept tokens and decoding continues at the right position.
    """

    keep_ratio: float = 1.0
    layer: int = 2
    method: str = "received"
    progressive: bool = False
    lossy: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, int | float) or not (
                0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"PruneTokens.keep_ratio={self.keep_ratio!r}: must be in (0, 1] (1 = keep all)")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"PruneTokens.layer={self.layer!r}: must be an int >= 1 (the first block that sees "
                             f"only the kept tokens; block layer-1 scores them)")
        if self.method not in METHODS:
            raise ValueError(f"PruneTokens.method={self.method!r}: valid values are {list(METHODS)}")


# ---------------------------------------------------------------------------------------------
# Ops the pass inserts
# ---------------------------------------------------------------------------------------------


def token_importance(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
                     method: str) -> torch.Tensor:
    """[B, S] importance of each key from one layer's q [B, H, S, d] and k [B, Hkv, S, d].

    Fused attention never materialises probabilities, so this recomputes them once, at the selection
    layer only: for "last" one query row ([B, H, 1, S]); for "received" query blocks of 64 rows at a time.
    """
    b, h, s, d = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    kt = k.float().transpose(-1, -2)
    rows = [s - 1] if method == "last" else None
    total = q.new_zeros(b, s, dtype=torch.float32)
    starts = range(s - 1, s) if rows else range(0, s, 64)
    for i0 in starts:
        i1 = s if rows else min(s, i0 + 64)
        scores = (q[:, :, i0:i1].float() @ kt) * scale  # [B, H, rows, S]
        if mask is not None:
            m = mask[..., i0:i1, :] if mask.dim() == 4 and mask.shape[-2] == s else mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        if is_causal:
            qi = torch.arange(i0, i1, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(s, device=q.device)[None, :] > qi, float("-inf"))
        total += scores.softmax(-1).nan_to_num(0.0).sum(dim=(1, 2))
    return total / (h * (1 if rows else s))


def select_tokens(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices [B, n_keep] of the kept tokens, ascending (causal order and positions are preserved).
    The last token always stays: its logits are the prediction."""
    score = score.clone()
    score[:, -1] = float("inf")
    return score.topk(n_keep, dim=-1, sorted=False).indices.sort(-1).values


@torch.library.custom_op("effcompile::prune_select", mutates_args=())
def prune_select(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
                 method: str, n_keep: int) -> torch.Tensor:
    """Importance at the selection layer + top-n_keep, as one opaque graph op."""
    return select_tokens(token_importance(q, k, mask, is_causal, scale, method), n_keep)


@prune_select.register_fake
def _(q, k, mask, is_causal, scale, method, n_keep):
    # Shape straight from n_keep: no guard on the sequence length, so one graph serves a whole bucket.
    return q.new_empty(q.shape[0], n_keep, dtype=torch.long)


def keep_count(s, keep_num: int):
    """round(keep_ratio * s), at least 1: an int, or a SymInt expression in a dynamic graph."""
    return torch.sym_max((s * keep_num + 5000) // 10000, 1)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """t with only the kept tokens along ``dim``; a broadcast batch dim (size 1) is expanded to idx's."""
    if t.shape[0] == 1 and idx.shape[0] != 1:
        t = t.expand(idx.shape[0], *t.shape[1:])
    shape = [idx.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = idx.shape[1]
    full = list(t.shape)
    full[dim] = idx.shape[1]
    return t.gather(dim, idx.view(shape).expand(full))


def restore_tokens(base: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, S, ...]: kept tokens from x at their positions, pruned ones keep their state from ``base``."""
    return base.scatter(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x), x)


# ---------------------------------------------------------------------------------------------
# Extending a pruned KV cache by a chunk of several tokens (opt-in, Hugging Face models)
# ---------------------------------------------------------------------------------------------

PRUNED_SDPA = "effcompile_pruned_sdpa"


@torch.library.custom_op("effcompile::pruned_cache_mask", mutates_args=())
def pruned_cache_mask(mask: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The mask of one block whose cache is pruned: [..., q, P + q] (built from layer 0's length P) ->
    [..., q, P_i + q] for this block's keys (P_i kept cache entries + the q new ones).

    The new tokens' columns are the last q of the mask (causal among the chunk). Which P_i of the P past
    positions the block kept is not recorded in the cache, so their columns can only be rebuilt when every
    query sees every past position (no padding there, no sliding window): otherwise a clear error.
    """
    q, total, kv = mask.shape[-2], mask.shape[-1], key.shape[-2]
    past = mask[..., : total - q]
    seen = past if past.dtype == torch.bool else past > torch.finfo(past.dtype).min / 2
    if not bool(seen.all()):
        raise ValueError(
            f"extending a KV cache pruned by PruneTokens ({kv - q} of {total - q} past tokens kept in this block) "
            f"with a mask that hides some past tokens (padding or a sliding window): the pruned cache does not "
            f"record which positions it kept, so that mask cannot be applied to it")
    return mask[..., total - kv:].clone()


@pruned_cache_mask.register_fake
def _(mask, key):
    return mask.new_empty(*mask.shape[:-1], key.shape[-2])


def _pruned_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Hugging Face's SDPA attention, with the mask fitted to this block's own key length."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = torch.ops.effcompile.pruned_cache_mask.default(attention_mask, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable_pruned_chunks(model):
    """Let a Hugging Face model (sdpa attention) extend a PruneTokens cache by several tokens per call.

    Hugging Face builds one attention mask for all blocks from block 0's cache length; the blocks from
    ``layer`` on hold fewer (kept) entries, so a multi-token chunk fails there with a shape error (while
    dynamo traces the model, before any pass sees a graph). This switches the model to an attention
    function that fits the mask to each block's keys (:func:`pruned_cache_mask`); it is SDPA otherwise,
    so outputs on an unpruned cache are unchanged. Returns the model.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if model.config._attn_implementation not in ("sdpa", PRUNED_SDPA):
        raise ValueError(f"enable_pruned_chunks needs attn_implementation='sdpa', the model uses "
                         f"{model.config._attn_implementation!r}")
    AttentionInterface.register(PRUNED_SDPA, _pruned_sdpa)
    AttentionMaskInterface.register(PRUNED_SDPA, sdpa_mask)
    model.set_attn_implementation(PRUNED_SDPA)
    return model


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _stage_keep(cfg: PruneTokens, n_stages: int, j: int) -> int:
    """keep_ratio (x10000) of the prompt kept after stage j: geometric from 1 down to keep_ratio."""
    return round(10000 * cfg.keep_ratio ** ((j + 1) / n_stages))


@register_pass(PruneTokens, phase="semantic")
def prune_tokens(gm: fx.GraphModule, cfg: PruneTokens, ctx: PassContext) -> PassResult:
    """Select tokens at block ``layer`` with the attention of the block before; shrink every later block."""
    model = tg.find_layers(gm, "PruneTokens")
    last = max(model.blocks)
    if cfg.layer > last:
        raise ValueError(f"PruneTokens.layer={cfg.layer} is past the last block: the model has blocks "
                         f"0..{last}, so layer must be in [1, {last}]")
    if cfg.keep_ratio == 1.0:
        return PassResult(modified=False, note="keep_ratio=1: every token kept, nothing to prune")
    for i in range(cfg.layer - 1, last + 1):
        if i not in model.blocks:
            raise ValueError(f"PruneTokens: block {i} has no scaled_dot_product_attention it can find")
    s_old = model.seq_len
    first = model.blocks[cfg.layer - 1]
    kv = ir.tensor_val(first.k)
    if kv is None or not tg.same_size(kv.shape[2], s_old):
        return PassResult(modified=False, note=f"keys of layers.{first.index} have length "
                                               f"{tuple(kv.shape)[2] if kv is not None else '?'} but the queries "
                                               f"{s_old}: this call extends a KV cache (decode or chunked "
                                               f"prefill); PruneTokens prunes a fresh prefill only")
    if isinstance(s_old, int) and s_old == 1:
        return PassResult(modified=False, note="one token: nothing to prune")

    work = ir.copy_graph_module(gm)
    wm = tg.find_layers(work, "PruneTokens")
    g = work.graph
    prune_at = list(range(cfg.layer, last + 1)) if cfg.progressive else [cfg.layer]
    seq = s_old if isinstance(s_old, int) else tg.sym_node(work, s_old)
    if seq is None:
        return PassResult(modified=False, note=f"sequence length {s_old} is symbolic and no graph value holds it")

    stage_of: dict[fx.Node, int] = {}
    stage_len: list = [s_old]
    idx_of: dict[int, fx.Node] = {}  # stage -> kept indices into the previous stage's tokens
    base_of: dict[int, fx.Node] = {}  # stage -> the stream before that stage's pruning
    ours: set = set()
    for stage, blk_i in enumerate(prune_at, start=1):
        scorer = wm.blocks[blk_i - 1]
        stream = _block_output(work, blk_i - 1)
        if stream is None:
            raise ValueError(f"PruneTokens: cannot find the output stream of layers.{blk_i - 1} (its last residual add)")
        keep_num = _stage_keep(cfg, len(prune_at), stage - 1)
        if isinstance(seq, int):
            n_keep = keep_count(seq, keep_num)
            anchor = stream
        else:
            n_keep = tg.insert_after(g, stream, keep_count, (seq, keep_num))
            anchor = n_keep
            ours.add(n_keep)
        mask = tg.sdpa_arg(scorer.sdpa, 3, "attn_mask")
        if stage > 1 and mask is not None:
            return PassResult(modified=False, note="progressive pruning with an explicit attention mask is not "
                                                   "supported (only is_causal attention); use progressive=False")
        causal = bool(tg.sdpa_arg(scorer.sdpa, 5, "is_causal", False))
        scale = tg.sdpa_arg(scorer.sdpa, 6, "scale", None)
        if scale is None:
            scale = float(ir.tensor_val(scorer.q).shape[-1]) ** -0.5
        users = [u for u in stream.users if u not in ours]
        if not isinstance(scale, fx.Node):  # dynamo turns the model's scaling into a graph value in dynamic graphs
            scale = float(scale)
        idx = tg.insert_after(g, anchor, torch.ops.effcompile.prune_select.default, (scorer.q, scorer.k, mask, causal, scale, cfg.method,
                                                         n_keep))
        x = tg.insert_after(g, idx, gather_tokens, (stream, idx, 1))
        for u in users:
            u.replace_input_with(stream, x)
        ours |= {idx, x}
        stage_of[x] = stage
        stage_of[idx] = stage
        idx_of[stage], base_of[stage] = idx, stream
        stage_len.append(n_keep)
        # Later stages score with the attention of an already-reduced block: the walk below rewrites it.

    # Original positions of the kept tokens, per stage: RoPE tables and masks are gathered with them.
    pos_of: dict[int, fx.Node] = {}

    def positions(stage: int, before: fx.Node) -> fx.Node:
        if stage not in pos_of:
            if stage == 1:
                pos_of[1] = idx_of[1]
            else:
                prev = positions(stage - 1, idx_of[stage])
                with g.inserting_after(idx_of[stage]):
                    pos_of[stage] = g.call_function(torch.gather, (prev, 1, idx_of[stage]))
                ours.add(pos_of[stage])
        return pos_of[stage]

    def on_foreign(node: fx.Node, value: fx.Node, stage: int, dims: list[int]) -> fx.Node:
        val = ir.tensor_val(value)
        if 0 in dims:
            raise tg.Refuse(f"{value.name} has the sequence in dim 0 (shape {tuple(val.shape)})")
        pos = positions(stage, node)
        out = value
        with g.inserting_before(node):
            for d in dims:
                out = g.call_function(gather_tokens, (out, pos, d))
                ours.add(out)
        return out

    def on_sdpa(node: fx.Node, stage: int) -> None:
        mask = tg.sdpa_arg(node, 3, "attn_mask")
        if mask is not None and not stage_of.get(mask, 0):
            val = ir.tensor_val(mask)  # [B, 1, Sq, Sk]: both sequence dims
            dims = [d for d in (val.dim() - 2, val.dim() - 1) if tg.same_size(val.shape[d], s_old)]
            tg.set_sdpa_mask(node, on_foreign(node, mask, stage, dims))

    def on_exit(value: fx.Node, stage: int, consumer: fx.Node) -> fx.Node:
        out = value
        with g.inserting_before(consumer):
            for j in range(stage, 0, -1):
                out = g.call_function(restore_tokens, (base_of[j], out, idx_of[j]))
                ours.add(out)
        return out

    def keep_at_output(value: fx.Node) -> bool:
        val = ir.tensor_val(value)  # KV cache tensors [B, Hkv, N, d] stay pruned: later blocks cache kept tokens
        return val is not None and val.dim() == 4

    try:
        tg.retarget_downstream(work, stage_of, stage_len, ours, on_sdpa=on_sdpa, on_exit=on_exit,
                               on_foreign=on_foreign, keep_at_output=keep_at_output)
    except tg.Refuse as e:
        return PassResult(modified=False, note=f"not applied: {e}")
    tg.adopt(gm, work)
    artifacts = {"seq_len": str(s_old), "method": cfg.method, "prune_at": [f"layers.{i}" for i in prune_at],
                 "scored_by": [f"layers.{i - 1}.attn" for i in prune_at],
                 "keep": {f"layers.{i}": (n if isinstance(n, int) else "round(keep * S) at run time")
                          for i, n in zip(prune_at, stage_len[1:], strict=True)}}
    return PassResult(modified=True, count=len(prune_at), where=[f"layers.{i}" for i in prune_at],
                      artifacts=artifacts)


def _block_output(gm: fx.GraphModule, block: int) -> fx.Node | None:
    """The stream leaving block ``block``: its last residual add."""
    last = None
    for n in gm.graph.nodes:
        t = ir.sublayer(n)
        if t is not None and t.block == block and t.kind == "residual":
            last = n
    return last


__all__ = ["PruneTokens", "enable_pruned_chunks", "pruned_cache_mask", "gather_tokens", "keep_count", "prune_select", "restore_tokens", "select_tokens",
           "token_importance"]
