"""IR op for grouped-query attention: effcompile::gqa_attention runs SDPA on the un-repeated K/V heads.

Hugging Face's SDPA path repeats each K/V head for its query heads (``repeat_kv``: expand + reshape, a
copy of the whole KV cache per layer and step) whenever an attention mask is passed, i.e. at every decode
step with a static cache. SDPA's ``enable_gqa=True`` reads the shared heads in place. Whether a fused SDPA
backend takes GQA depends on the device and inputs (on CUDA flash refuses a mask and memory-efficient
refuses unequal head counts; cuDNN may take both), and when none does SDPA drops to its unfused math
path, slower than the copy. So the choice is made per call, on the real tensors: GQA where a fused backend
accepts it, else the repeat as before (the same result either way).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

# How calls ran (tests, benchmarks/decode.py): "gqa" (enable_gqa=True) or "repeat" (K/V heads repeated first).
PATH_COUNTS: Counter = Counter()


# The backends' verdicts per (device, dtypes, shapes, strides, dropout, causal): eager decode asks once a layer.
_VERDICTS: dict[tuple, bool] = {}


def native_gqa(q, k, v, attn_mask, dropout_p: float, is_causal: bool) -> bool:
    """Whether SDPA with enable_gqa=True runs a fused kernel for these tensors (else it would run unfused)."""
    if q.device.type != "cuda":
        return True  # CPU: the flash kernel takes GQA with or without a mask (torch >= 2.5)
    key = (q.device, dropout_p, is_causal, torch.backends.cuda.flash_sdp_enabled(),
           torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
           *((t.dtype, tuple(t.shape), t.stride()) if t is not None else None for t in (q, k, v, attn_mask)))
    if key not in _VERDICTS:
        if len(_VERDICTS) >= 4096:  # a growing (dynamic) cache is a new shape every step: keep this bounded
            _VERDICTS.clear()
        params = torch.backends.cuda.SDPAParams(q, k, v, attn_mask, dropout_p, is_causal, True)
        _VERDICTS[key] = any(fn(params, False) for fn in (torch.backends.cuda.can_use_flash_attention,
                                                          torch.backends.cuda.can_use_efficient_attention,
                                                          torch.backends.cuda.can_use_cudnn_attention))
    return _VERDICTS[key]


def gqa_attention_eager(q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale: float | None):
    """SDPA of q [..., Hq, S, D] over k, v [..., Hkv, L, D], Hq a multiple of Hkv; query head h reads K/V
    head h // (Hq / Hkv), as repeat_kv arranges them."""
    if native_gqa(q, k, v, attn_mask, dropout_p, is_causal):
        PATH_COUNTS["gqa"] += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=True)
    PATH_COUNTS["repeat"] += 1
    rep = q.shape[-3] // k.shape[-3]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3),
                                          attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def _register(name: str) -> None:
    """An IR attention op ``effcompile::<name>`` whose eager implementation is gqa_attention_eager."""
    if hasattr(torch.ops.effcompile, name):
        return

    @torch.library.custom_op("effcompile::" + name, mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
           is_causal: bool, scale: float | None) -> torch.Tensor:
        return gqa_attention_eager(q, k, v, attn_mask, dropout_p, is_causal, scale)

    @op.register_fake
    def _fake(q, k, v, attn_mask, dropout_p, is_causal, scale):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))


_register("gqa_attention")
# The same attention, marked for the decode kernel (GroupedQueryAttention(decode_kernel=True)): lower() retargets
# it to codegen/kernels/decode_attention.py, which runs SDPA as above for the calls it does not take.
_register("decode_gqa_attention")


def attention_op_targets() -> tuple:
    """The IR attention ops (the SDPA call sites a mask pass may rewrite)."""
    return (torch.ops.effcompile.gqa_attention.default, torch.ops.effcompile.decode_gqa_attention.default)
