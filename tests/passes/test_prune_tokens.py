"""PruneTokens: validation, structure, eager reference (token-identical generation), RoPE positions, buckets, errors."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import effcompile as ec
from effcompile.passes.prune_tokens import PruneTokens, enable_pruned_chunks, token_importance
from effcompile.testing import tiny_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_reference import chunk_from, greedy_from, pruned_prefill  # noqa: E402


def _rec(fast, i=0):
    return [p for p in ec.explain(fast).graphs[i].passes if p.name == "prune_tokens"][0]


@pytest.fixture(scope="module")
def lm():
    from effcompile.bench.zoo import heldout_ids, load_stdlib_lm

    model, tok = load_stdlib_lm()
    return model, heldout_ids(tok)


@pytest.mark.parametrize("kwargs,field", [
    ({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"), ({"keep_ratio": -0.2}, "keep_ratio"),
    ({"keep_ratio": "all"}, "keep_ratio"), ({"layer": 0}, "layer"), ({"method": "h2o"}, "method"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PruneTokens(**kwargs)


def test_layer_past_the_last_block_is_a_clear_error():
    model = tiny_hf("llama", layers=2)
    with pytest.raises(Exception, match=r"layer=5 is past the last block.*\[1, 1\]"):
        ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.5, layer=5)])(torch.randint(0, 128, (2, 12)))


def test_model_without_attention_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with pytest.raises(Exception, match="PruneTokens needs attention it can find"):
        ec.effcompile(mlp, passes=[PruneTokens(keep_ratio=0.5, layer=1)])(torch.randn(2, 5, 8))


def test_keep_all_does_not_fire_and_equals_eager_exactly():
    model = tiny_hf("llama", layers=3)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        plain = ec.effcompile(model)(input_ids=ids).logits
        torch._dynamo.reset()
        fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=1.0, layer=1)])
        out = fast(input_ids=ids).logits
    assert not _rec(fast).modified and "keep_ratio=1" in _rec(fast).note
    assert torch.equal(out, plain)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq", [32, 64, 128])
def test_sequence_length_equal_to_a_weight_dim_still_prunes(seq):
    # tiny llama: k/v_proj out 32, hidden 64, MLP 128. A weight dim equal to the prompt length is no
    # sequence dim (the 4-layer stdlib LM's 128-wide k_proj kept PruneTokens off at 128-token prompts).
    model = tiny_hf("llama", layers=3)
    ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
    fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.5, layer=1, method="last")])
    with torch.no_grad():
        out = fast(input_ids=ids, use_cache=True)
    assert _rec(fast).modified, _rec(fast).note
    ref_logits, ref_cache = pruned_prefill(model, ids, 0.5, 1, "last")
    torch.testing.assert_close(out.logits[:, -1], ref_logits, rtol=1e-4, atol=1e-4)
    assert [lay.keys.shape[2] for lay in out.past_key_values.layers] == [seq, seq // 2, seq // 2]


def test_structure_kv_cache_of_later_blocks_holds_only_kept_tokens():
    model = tiny_hf("llama", layers=4)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.5, layer=2)])
        out = fast(input_ids=ids, use_cache=True)
    rec = _rec(fast)
    assert rec.modified and rec.where == ["layers.2"] and rec.artifacts["keep"] == {"layers.2": 10}
    assert out.logits.shape == (2, 20, 128)  # drop-in: pruned positions are restored at the exit
    assert [lay.keys.shape[2] for lay in out.past_key_values.layers] == [20, 20, 10, 10]


def test_progressive_prunes_at_every_later_block():
    model = tiny_hf("llama", layers=4)
    with torch.no_grad():
        fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.25, layer=1, progressive=True)])
        out = fast(input_ids=torch.randint(0, 128, (2, 40)), use_cache=True)
    assert _rec(fast).where == ["layers.1", "layers.2", "layers.3"]
    assert [lay.keys.shape[2] for lay in out.past_key_values.layers] == [40, 25, 16, 10]


@pytest.mark.parametrize("method", ["received", "last"])
def test_generation_matches_the_eager_reference_token_for_token(lm, method):
    model, ids = lm
    prompts = ids[2000:2000 + 2 * 48].view(2, 48)
    fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.5, layer=2, method=method)])
    with torch.no_grad():
        out = fast(input_ids=prompts, use_cache=True)
    ref_logits, ref_cache = pruned_prefill(model, prompts, 0.5, 2, method)
    torch.testing.assert_close(out.logits[:, -1], ref_logits, rtol=1e-4, atol=1e-4)
    for mine, ref in zip(out.past_key_values.layers, ref_cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-4, atol=1e-4)  # original RoPE positions
    ours = greedy_from(fast, out.logits[:, -1], out.past_key_values, 12)  # decode through the compiled model
    theirs = greedy_from(model, ref_logits, ref_cache, 12)
    assert torch.equal(ours, theirs)
    decode = [p for g in ec.explain(fast).graphs[1:] for p in g.passes if p.name == "prune_tokens"]
    assert decode and not any(p.modified for p in decode) and "extends a KV cache" in decode[0].note


def test_chunks_on_a_pruned_cache_match_the_eager_reference(lm):
    # Hugging Face builds one mask from block 0's (full) cache length; enable_pruned_chunks fits it to each
    # pruned block's keys. Reference: block by block, each block's mask from its own cache length.
    model, ids = lm
    chunked = enable_pruned_chunks(copy.deepcopy(model))
    prompts = ids[3000:3000 + 2 * 64].view(2, 64)
    fast = ec.effcompile(chunked, passes=[PruneTokens(keep_ratio=0.5, layer=2, method="last")])
    with torch.no_grad():
        cache = fast(input_ids=prompts[:, :40], use_cache=True).past_key_values
    ref_logits, ref_cache = pruned_prefill(model, prompts[:, :40], 0.5, 2, "last")
    for chunk in prompts[:, 40:].split(8, dim=1):
        with torch.no_grad():
            out = fast(input_ids=chunk, cache=cache, use_cache=True)
        cache = out.past_key_values
        ref = chunk_from(model, chunk, ref_cache)
        torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    assert [lay.keys.shape[2] for lay in cache.layers] == [64, 64, 44, 44]
    for mine, theirs in zip(cache.layers, ref_cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy_from(fast, out.logits[:, -1], cache, 8), greedy_from(model, ref[:, -1], ref_cache, 8))


def test_chunk_with_hidden_past_tokens_on_a_pruned_cache_is_a_clear_error():
    model = enable_pruned_chunks(tiny_hf("llama", layers=3))
    fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.5, layer=1)])
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 0] = 0  # a padded past token: which kept entry it is, the pruned cache does not say
    with torch.no_grad():
        cache = fast(input_ids=ids[:, :16], use_cache=True).past_key_values
        with pytest.raises(Exception, match="does not record which positions it kept"):
            fast(input_ids=ids[:, 16:], attention_mask=mask, cache=cache, use_cache=True)


def test_chunk_on_a_pruned_cache_without_the_helper_is_a_clear_error():
    fast = ec.effcompile(tiny_hf("llama", layers=3), passes=[PruneTokens(keep_ratio=0.5, layer=1)])
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        cache = fast(input_ids=ids[:, :16], use_cache=True).past_key_values
        fast(input_ids=ids[:, 16:17], cache=cache, use_cache=True)  # one token per call works as is
        with pytest.raises(ValueError, match=r"enable_pruned_chunks.*one token per call") as info:
            fast(input_ids=ids[:, 17:], cache=cache, use_cache=True)
    assert "[17, 9, 9]" in str(info.value) and info.value.__cause__ is not None


def test_no_recompile_across_prompt_lengths_inside_a_bucket():
    model = tiny_hf("llama", layers=3)
    fast = ec.effcompile(model, passes=[PruneTokens(keep_ratio=0.5, layer=1)], dynamic=True)
    with torch.no_grad():
        for n in (20, 23, 27, 31):
            out = fast(input_ids=torch.randint(0, 128, (2, n)), use_cache=True)
            assert out.logits.shape == (2, n, 128)
            assert [lay.keys.shape[2] for lay in out.past_key_values.layers] == [n, round(n / 2), round(n / 2)]
    graphs = ec.explain(fast).graphs
    assert len(graphs) == 1, "dynamo recompiled"
    assert graphs[0].recompiles == [] and _rec(fast).modified


def test_importance_last_is_the_last_query_row():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    probs = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1)
    torch.testing.assert_close(token_importance(q, k, None, True, 0.5, "last"), probs[:, :, -1].mean(1))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    probs = ((q @ k.transpose(-1, -2)) * 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(token_importance(q, k, None, True, 0.5, "received"), probs.mean(dim=(1, 2)))


def test_spec_name_parses():
    from effcompile.bench.spec import parse_passes

    assert parse_passes("prune_tokens(keep_ratio=0.5,layer=2)")[1] == [PruneTokens(keep_ratio=0.5, layer=2)]
