"""AdditiveAttentionMask: one boolean mask read by every layer's SDPA is made additive once (exact)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import effcompile as ec
from effcompile.compiler import ir
from effcompile.passes.attention_mask import AdditiveAttentionMask
from effcompile.testing import tiny_hf


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "additive_attention_mask"]


def _masks(fast) -> list[torch.dtype]:
    """The dtype of every mask an attention call reads in the compiled graphs."""
    out = []
    for g in ec.explain(fast).graphs:
        for gm in g.graph_modules():
            for n in gm.graph.nodes:
                if n.op != "call_function":
                    continue
                if n.target is F.scaled_dot_product_attention:
                    mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
                elif n.target is torch.ops.effcompile.gqa_attention.default:
                    mask = n.args[3]
                else:
                    continue
                out.append(ir.tensor_val(mask).dtype)
    return out


def _decode(model, passes):
    from transformers import StaticCache

    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    fast = ec.effcompile(model, passes=passes, cache=False)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        out = fast(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([6]))
    return fast, out.logits


def test_decode_layers_share_one_additive_mask_and_match_eager():
    llama = tiny_hf("llama", layers=3, hidden=64, heads=4)
    fast, got = _decode(llama, None)  # the default pipeline
    plain, want = _decode(llama, [AdditiveAttentionMask(enabled=False)])
    (rec,) = [r for r in _record(fast) if r.modified]
    assert rec.count == 3 and rec.where == ["layers.0.attn", "layers.1.attn", "layers.2.attn"]
    assert _masks(fast) == [torch.float32] * 3
    assert _masks(plain) == [torch.bool] * 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _two_calls(q, k, v, mask):
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(a, k, v, mask, scale=0.5)  # positional mask too


def _one_call(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _args(dtype=torch.float32, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    mask[..., 0] = True  # every query attends somewhere: no all -inf row
    if mask_dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(~mask, float("-inf"))
    return q, k, v, mask


def test_two_calls_share_it_in_each_dtype_and_the_result_is_bitwise_equal():
    for dtype in (torch.float32, torch.bfloat16):
        args = _args(dtype)
        fast = ec.effcompile(_two_calls, cache=False)
        assert torch.equal(fast(*args), _two_calls(*args))
        (rec,) = _record(fast)
        assert rec.modified and rec.count == 2
        assert _masks(fast) == [dtype, dtype]


def test_a_single_reader_or_an_additive_mask_is_left_alone():
    fast = ec.effcompile(_one_call, cache=False)
    args = _args()
    assert torch.equal(fast(*args), _one_call(*args))
    (rec,) = _record(fast)
    assert not rec.modified and "only reader" in rec.note
    additive = ec.effcompile(_two_calls, cache=False)
    args = _args(mask_dtype=torch.float32)
    assert torch.equal(additive(*args), _two_calls(*args))
    (rec,) = _record(additive)
    assert not rec.modified and "already additive" in rec.note
