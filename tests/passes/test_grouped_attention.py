"""GroupedQueryAttention: SDPA over repeat_kv'd K/V heads reads the shared heads instead (exact)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effcompile as ec
from effcompile.compiler import attention_ops
from effcompile.passes.grouped_attention import GroupedQueryAttention
from effcompile.testing import tiny_hf


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64, heads=4)  # 2 K/V heads: each repeated for 2 query heads


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "grouped_query_attention"]


def _targets(fast) -> list[str]:
    return [str(n.target) for g in ec.explain(fast).graphs for gm in g.graph_modules() for n in gm.graph.nodes]


def _decode(model, passes):
    """Logits of a prompt then one decode step with a static cache (HF masks every step: K/V repeated)."""
    from transformers import StaticCache

    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    fast = ec.effcompile(model, passes=passes, cache=False)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)  # prefill in eager: the same cache for both
        out = fast(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([6]))
    return fast, out.logits


def test_decode_attention_reads_the_shared_heads_and_matches_eager(llama):
    before = attention_ops.PATH_COUNTS["gqa"]
    fast, got = _decode(llama, None)  # the default pipeline
    plain, want = _decode(llama, [GroupedQueryAttention(enabled=False)])
    (rec,) = [r for r in _record(fast) if r.modified]
    assert rec.count == 2 and rec.where == ["layers.0.attn", "layers.1.attn"]
    targets, before_targets = _targets(fast), _targets(plain)
    assert targets.count("effcompile.gqa_attention.default") == 2
    assert not any("scaled_dot_product_attention" in t for t in targets)
    assert before_targets.count("expand") - targets.count("expand") == 4  # K and V per layer
    assert attention_ops.PATH_COUNTS["gqa"] == before + 2  # CPU: SDPA's fused kernel with enable_gqa
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_multi_head_attention_is_left_alone():
    gpt2 = tiny_hf("gpt2", layers=1)
    fast = ec.effcompile(gpt2, cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 128, (1, 5)))
    assert not any(r.modified for r in _record(fast))
    assert "effcompile.gqa_attention.default" not in _targets(fast)


def _sdpa_of_repeats(q, k, v, mask):
    rep = lambda x: x[:, :, None, :, :].expand(1, 2, 3, 7, 16).reshape(1, 6, 7, 16)  # noqa: E731
    return F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask, scale=0.3)


def _sdpa_reading_a_repeat_twice(q, k, v, mask):
    kr = k[:, :, None, :, :].expand(1, 2, 3, 7, 16).reshape(1, 6, 7, 16)
    vr = v[:, :, None, :, :].expand(1, 2, 3, 7, 16).reshape(1, 6, 7, 16)
    return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask), kr.sum()


def _args():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g),
            torch.randn(1, 2, 7, 16, generator=g), torch.rand(1, 1, 1, 7, generator=g) > 0.3)


def test_plain_function_rewrites_and_one_whose_repeat_has_another_reader_does_not():
    args = _args()
    fast = ec.effcompile(_sdpa_of_repeats, cache=False)
    torch.testing.assert_close(fast(*args), _sdpa_of_repeats(*args), rtol=1e-6, atol=1e-6)
    assert [r.count for r in _record(fast)] == [1]
    kept = ec.effcompile(_sdpa_reading_a_repeat_twice, cache=False)
    got = kept(*args)
    torch.testing.assert_close(got[0], _sdpa_reading_a_repeat_twice(*args)[0])
    (rec,) = _record(kept)
    assert not rec.modified and "other readers" in rec.note


def test_without_a_fused_gqa_backend_the_op_repeats_the_heads(monkeypatch):
    # On CUDA a backend may refuse GQA (flash: no mask; memory-efficient: unequal heads): the op then repeats
    # K/V itself rather than let SDPA fall to its unfused math path.
    monkeypatch.setattr(attention_ops, "native_gqa", lambda *a: False)
    q, k, v, mask = _args()
    before = attention_ops.PATH_COUNTS["repeat"]
    got = torch.ops.effcompile.gqa_attention(q, k, v, mask, 0.0, False, 0.3)
    assert attention_ops.PATH_COUNTS["repeat"] == before + 1
    torch.testing.assert_close(got, _sdpa_of_repeats(q, k, v, mask), rtol=1e-6, atol=1e-6)


def test_decode_kernel_option_runs_one_token_calls_in_the_triton_kernel_and_matches_eager(llama, monkeypatch):
    # GroupedQueryAttention(decode_kernel=True): the op lower() retargets to codegen/kernels/decode_attention.py,
    # run here by the interpreter as on a GPU (calls of more than one query token run SDPA inside the same op:
    # test_decode_attention.py).
    from effcompile.codegen import ops as cg_ops
    from effcompile.codegen.kernels import decode_attention as DA

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = dict(cg_ops.PATH_COUNTS[DA.NAME])
    fast, got = _decode(llama, [GroupedQueryAttention(decode_kernel=True)])
    _, want = _decode(llama, [GroupedQueryAttention(enabled=False)])
    targets = _targets(fast)
    assert targets.count("effcompile.decode_attention.default") == 2 and "effcompile.gqa_attention.default" not in targets
    kernels = [k for g in ec.explain(fast).graphs for k in g.kernels if k.name == DA.NAME]
    assert len(kernels) == 2 and kernels[0].ops == ("decode_gqa_attention", "masked")
    assert cg_ops.PATH_COUNTS[DA.NAME]["triton"] == before.get("triton", 0) + 2  # both layers' decode steps
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
