"""Hypothesis: degenerate token configs (ratio 0, keep_ratio 1) equal eager on random tiny HF models, and
merging only padding is lossless (the whole merge/bias/unmerge machinery, on random shapes)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effcompile as ec
from effcompile.passes.merge_tokens import MergeTokens
from effcompile.passes.prune_tokens import PruneTokens

FUZZ = settings(max_examples=5, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _model(kind, layers, heads, head_dim, seed):
    import transformers as tf

    torch.manual_seed(seed)
    hidden = heads * head_dim
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=hidden * 2, max_position_embeddings=128)
        return tf.BertModel(cfg).eval()
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


shapes = st.tuples(st.integers(2, 3), st.sampled_from([2, 4]), st.sampled_from([8, 12]), st.integers(0, 99))


@settings(FUZZ, max_examples=3)  # three compiles per example and model: keep the file near a minute
@given(shape=shapes, seq=st.integers(9, 30), batch=st.integers(1, 3))
def test_ratio_zero_and_keep_all_equal_eager(shape, seq, batch):
    layers, heads, head_dim, seed = shape
    for kind, cfg in (("bert", MergeTokens(ratio=0.0)), ("llama", PruneTokens(keep_ratio=1.0, layer=1))):
        torch._dynamo.reset()
        model = _model(kind, layers, heads, head_dim, seed)
        ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = model(input_ids=ids)[0]
            plain = ec.effcompile(model, cache=False)(input_ids=ids)[0]
            torch._dynamo.reset()
            fast = ec.effcompile(model, passes=[cfg], cache=False)
            out = fast(input_ids=ids)[0]
        assert not any(p.modified for g in ec.explain(fast).graphs for p in g.passes
                       if p.name in ("merge_tokens", "prune_tokens"))
        assert torch.equal(out, plain)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@FUZZ
@given(shape=shapes, real=st.integers(4, 16), pads=st.integers(6, 24), r=st.integers(1, 3))
def test_merging_only_padding_equals_eager(shape, real, pads, r):
    layers, heads, head_dim, seed = shape
    if pads < 2 * r * (layers + 1) + 2:  # about half the padding is in set A at each layer: it must cover r
        return
    seq = real + pads
    if seq in (2, heads, head_dim, heads * head_dim):
        return  # a size equal to the sequence length makes the pass refuse (tested elsewhere)
    torch._dynamo.reset()
    model = _model("bert", layers, heads, head_dim, seed)
    ids = torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(2, seq, dtype=torch.long)
    mask[0, :real] = 1
    mask[1, :max(1, real - 3)] = 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        fast = ec.effcompile(model, passes=[MergeTokens(r=r)], cache=False)
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.bool()
    torch.testing.assert_close(out[m], ref[m], rtol=1e-4, atol=1e-5)
