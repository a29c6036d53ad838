"""Eager reference of PruneTokens for HF Llama: layer by layer, written independently of the pass."""

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@torch.no_grad()
def _importance(blk, h, pe, method):
    attn = blk.self_attn
    b, s, _ = h.shape
    hd = attn.head_dim
    x = blk.input_layernorm(h)
    q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, H, S, S]
    if method == "last":
        return probs[:, :, -1].mean(1)
    return probs.sum(dim=(1, 2)) / (q.shape[1] * s)


@torch.no_grad()
def pruned_prefill(model, ids, keep_ratio, layer, method="received"):
    """(last-token logits [B, V], DynamicCache) of FastV/GemFilter pruning at ``layer`` in plain eager code."""
    base = model.model
    cache = DynamicCache(config=model.config)
    b, s = ids.shape
    h = base.embed_tokens(ids)
    pos = torch.arange(s)[None].expand(b, s)
    h_in_prev = pe_prev = None  # the previous layer's input, set from layer 0 on (layer >= 1)
    for i, blk in enumerate(base.layers):
        pe = base.rotary_emb(h, pos)
        if i == layer:
            prev = base.layers[i - 1]
            score = _importance(prev, h_in_prev, pe_prev, method)
            score[:, -1] = float("inf")  # the last token predicts the next one: always kept
            n_keep = max(1, round(keep_ratio * s))
            keep = score.topk(n_keep, dim=-1).indices.sort(-1).values
            h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
            pos = pos.gather(1, keep)
            pe = base.rotary_emb(h, pos)  # original positions: RoPE as if nothing was removed
        h_in_prev, pe_prev = h, pe
        out = blk(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                  position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(base.norm(h))[:, -1], cache


@torch.no_grad()
def greedy_from(model, logits, cache, steps):
    """Greedy continuation with the eager model from a prefill's last logits and its (pruned) KV cache."""
    toks = []
    nxt = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        toks.append(nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(toks, 1)


@torch.no_grad()
def chunk_from(model, ids, cache):
    """Feed a chunk of several tokens on a (pruned) cache, block by block: each block's mask is built from
    its own cache length (every kept entry visible, causal among the chunk). Returns the logits [B, q, V]."""
    base = model.model
    b, q = ids.shape
    p0 = cache.layers[0].keys.shape[2]  # positions continue after the full prompt
    pos = (p0 + torch.arange(q))[None].expand(b, q)
    h = base.embed_tokens(ids)
    pe = base.rotary_emb(h, pos)
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    for i, blk in enumerate(base.layers):
        past = cache.layers[i].keys.shape[2]
        mask = torch.cat([torch.ones(q, past, dtype=torch.bool), causal], 1)[None, None].expand(b, 1, q, past + q)
        out = blk(h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(base.norm(h))
