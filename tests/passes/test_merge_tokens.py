"""MergeTokens (ToMe): config validation, structure, lossless padding merges, unmerge, quality on MiniLM, errors."""

import pytest
import torch

import effcompile as ec
from effcompile.bench.metrics import mean_pool, ranking_agreement
from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext, PassFailed, PassManager
from effcompile.passes.merge_tokens import MergeTokens, tome_merge
from effcompile.testing import capture, tiny_hf


def _bert_inputs(lengths, seq, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _run_pass(model, inputs, cfg):
    (gm, ex), = capture(model, **inputs)
    ir.annotate(gm, ex)
    params = {n.name: v for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), ex, strict=False)
              if isinstance(v, torch.nn.Parameter)}
    rec, = [r for r in PassManager([cfg]).run(gm, PassContext(ex, params=params)) if r.name == "merge_tokens"]
    return gm, ex, rec


def _pooled(out, mask):
    return mean_pool(out.last_hidden_state, mask)


@pytest.mark.parametrize("kwargs,field", [
    ({"ratio": -0.1}, "ratio"), ({"ratio": 1.0}, "ratio"), ({"ratio": "half"}, "ratio"),
    ({"schedule": "cosine"}, "schedule"), ({"r": -1}, "r"), ({"r": (2, "x")}, "r"),
    ({"ratio": 0.5, "r": 2}, "ratio or r"), ({"layers": (-1,)}, "layers"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MergeTokens(**kwargs)


def test_config_is_hashable_and_normalized():
    assert MergeTokens(r=[1, 2], layers=[1, 0]) == MergeTokens(r=(1, 2), layers=(0, 1))
    hash(MergeTokens(ratio=0.5))


def test_structure_on_tiny_bert_merges_every_layer_and_unmerges_at_the_exit():
    model = tiny_hf("bert", layers=3)
    inputs = _bert_inputs([20, 13], 20)
    gm, ex, rec = _run_pass(model, inputs, MergeTokens(ratio=0.5))
    assert rec.modified and rec.count == 3 and rec.where == ["layers.0.attn", "layers.1.attn", "layers.2.attn"]
    assert rec.artifacts["r_per_layer"] == {"layers.0": 3, "layers.1": 4, "layers.2": 3}
    assert rec.artifacts["tokens_after_layer"]["layers.2"] == 10
    names = [ir.target_name(n) for n in gm.graph.nodes]
    assert sum("tome_merge" in x for x in names) == 3 and names.count("tome_unmerge") >= 1
    # Layers after the first merge attend with proportional attention (log-size bias), not the bool mask.
    sdpa = [n for n in gm.graph.nodes if ir.target_name(n) == "scaled_dot_product_attention"]
    masks = [ir.target_name(n.kwargs["attn_mask"]) for n in sdpa]
    assert masks[0] != "tome_bias" and masks[1:] == ["tome_bias", "tome_bias"]
    # The reduced sequence flows through the later layers, and the output is [B, S, H] again.
    assert ir.tensor_val(sdpa[2].args[0]).shape[2] == 13
    out = gm(*ex)
    with torch.no_grad():
        ref = model(**inputs)
    assert out[0].shape == ref.last_hidden_state.shape


def test_ratio_zero_does_not_fire_and_equals_eager_exactly():
    model = tiny_hf("bert", layers=2)
    inputs = _bert_inputs([24, 9], 24)
    with torch.no_grad():
        ref = model(**inputs)
        plain = ec.effcompile(model)(**inputs)
        torch._dynamo.reset()
        fast = ec.effcompile(model, passes=[MergeTokens(ratio=0.0)])
        out = fast(**inputs)
    rec, = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "merge_tokens"]
    assert not rec.modified and "ratio=0" in rec.note
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_merging_only_padding_is_lossless():
    # Padding has size 0, so merging it changes no real token: the proof that sizes, the log-size
    # bias, the source map and the unmerge are consistent. 16 pads in A across 3 layers >= the 12 merged.
    model = tiny_hf("bert", layers=3)
    inputs = _bert_inputs([32, 30], 64)
    inputs["attention_mask"][:, 32:] = 0
    with torch.no_grad():
        ref = model(**inputs)
        fast = ec.effcompile(model, passes=[MergeTokens(r=4)])
        out = fast(**inputs)
    m = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[m], ref.last_hidden_state[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-5)


def test_dynamic_lengths_merge_in_one_graph_without_recompiling():
    # dynamic=True: the sequence length is symbolic, the per-layer counts are computed from it at run
    # time, and every length inside a shape bucket reuses the one compiled variant.
    model = tiny_hf("bert", layers=2)
    fast = ec.effcompile(model, passes=[MergeTokens(ratio=0.5)], dynamic=True)
    with torch.no_grad():
        for n in (20, 23, 27, 32):
            inputs = _bert_inputs([n, n - 3], n, seed=n)
            out = fast(**inputs)
            assert out.last_hidden_state.shape == (2, n, 64)
            assert torch.isfinite(out.last_hidden_state).all()
    graph, = ec.explain(fast).graphs
    rec, = [p for p in graph.passes if p.name == "merge_tokens"]
    assert rec.modified and "run time" in rec.artifacts["counts"]
    assert graph.recompiles == []


def test_tome_merge_averages_by_size_and_maps_every_source():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    k = torch.randn(2, 3, 7, 4)
    k[:, :, 3] = k[:, :, 2] * 2.0  # token 3 (B) is a scaled copy of token 2 (A): cosine 1, merged first
    size = torch.ones(2, 7)
    src = torch.arange(7).expand(2, 7)
    out, new_size, new_src = tome_merge(x, k, size, src, 1, True)
    assert out.shape == (2, 6, 5) and new_size.sum(1).tolist() == [7.0, 7.0]
    assert new_src[:, 2].tolist() == new_src[:, 3].tolist()  # merged tokens share one slot
    torch.testing.assert_close(out.gather(1, new_src[..., None].expand(-1, -1, 5))[:, 2], (x[:, 2] + x[:, 3]) / 2)
    assert sorted(new_src[0].unique().tolist()) == list(range(6))


def _reference_merge(x, k, size, src, r, protect_first):
    """ToMe's bipartite matching row by row in plain Python: the vectorized op must agree with it."""
    outs, sizes, srcs = [], [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        best = []
        for i, ai in enumerate(a_idx):
            sims = []
            for bj in b_idx:
                cos = torch.nn.functional.cosine_similarity(k[b, :, ai], k[b, :, bj], dim=-1).mean().item()
                sims.append(2.0 if size[b, ai] == 0 else cos if size[b, bj] > 0 else float("-inf"))
            if protect_first and i == 0:
                sims = [float("-inf")] * len(sims)
            j = max(range(len(sims)), key=lambda j: (sims[j], -j))  # first of the best
            best.append((sims[j], j))
        order = sorted(range(len(a_idx)), key=lambda i: -best[i][0])  # stable: earlier A first on ties
        merged, kept = order[:r], sorted(order[r:])
        rows = [x[b, a_idx[i]] for i in kept] + [x[b, bj] for bj in b_idx]
        sz = [size[b, a_idx[i]] for i in kept] + [size[b, bj] for bj in b_idx]
        acc = [x[b, bj] * size[b, bj] for bj in b_idx]
        tot = [size[b, bj].clone() for bj in b_idx]
        go = {a_idx[i]: pos for pos, i in enumerate(kept)}
        go |= {bj: len(kept) + j for j, bj in enumerate(b_idx)}
        for i in merged:
            j = best[i][1]
            acc[j] = acc[j] + x[b, a_idx[i]] * size[b, a_idx[i]]
            tot[j] = tot[j] + size[b, a_idx[i]]
            go[a_idx[i]] = len(kept) + j
            rows[len(kept) + j] = acc[j] / tot[j]
            sz[len(kept) + j] = tot[j]
        outs.append(torch.stack(rows))
        sizes.append(torch.stack(sz))
        srcs.append(torch.tensor([go[int(t)] for t in src[b]]))
    return torch.stack(outs), torch.stack(sizes), torch.stack(srcs)


@pytest.mark.parametrize("n,r,protect", [(12, 5, True), (13, 6, False), (9, 3, True), (16, 0, True)])
def test_tome_merge_equals_a_row_by_row_reference(n, r, protect):
    # Per-head key cosine averaged over heads, padding (size 0) merged first, sizes > 1 from earlier merges,
    # odd lengths (the last token is in A), a source map longer than the stream.
    g = torch.Generator().manual_seed(n + r)
    x, k = torch.randn(3, n, 6, generator=g), torch.randn(3, 4, n, 5, generator=g)
    size = torch.randint(1, 4, (3, n), generator=g).float()
    size[1, -4:] = 0  # a padded row
    src = torch.randint(0, n, (3, n + 7), generator=g)
    out, new_size, new_src = tome_merge(x, k, size, src, r, protect)
    ref_out, ref_size, ref_src = _reference_merge(x, k, size, src, r, protect)
    assert torch.equal(new_src, ref_src) and torch.equal(new_size, ref_size)
    real = new_size > 0
    torch.testing.assert_close(out[real], ref_out[real], rtol=1e-5, atol=1e-6)


def test_first_token_is_protected():
    x = torch.randn(1, 6, 4)
    k = torch.ones(1, 1, 6, 4)  # every pair equally similar
    _, _, src = tome_merge(x, k, torch.ones(1, 6), torch.arange(6)[None], 2, True)
    assert (src[0] == src[0, 0]).sum() == 1


def test_vit_merges_and_keeps_output_shapes():
    from effcompile.bench.zoo import random_model

    model, make_inputs = random_model("vit", "tiny")
    inputs = make_inputs(2)
    with torch.no_grad():
        ref = model(**inputs)
        fast = ec.effcompile(model, passes=[MergeTokens(ratio=0.5)])
        out = fast(**inputs)
    rec, = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "merge_tokens"]
    assert rec.modified, rec.note
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert torch.isfinite(out.last_hidden_state).all()


def test_causal_model_is_refused_with_a_pointer_to_prune_tokens():
    model = tiny_hf("llama")
    with pytest.raises(Exception, match="bidirectional.*PruneTokens"):
        ec.effcompile(model, passes=[MergeTokens(ratio=0.5)])(torch.randint(0, 128, (2, 12)))


def test_model_without_attention_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(Exception, match="scaled_dot_product_attention"):
        ec.effcompile(mlp, passes=[MergeTokens(ratio=0.5)])(torch.randn(2, 5, 8))


def test_layers_past_the_last_block_is_a_clear_error():
    model = tiny_hf("bert", layers=2)
    with pytest.raises(PassFailed, match=r"block\(s\) \[5\] do not exist"):
        _run_pass(model, _bert_inputs([10, 10], 10), MergeTokens(ratio=0.5, layers=(0, 5)))


def test_batch_and_head_dim_equal_to_the_sequence_length_are_told_apart():
    # tiny BERT has head_dim 16: with S = 16 (and B = 16) sizes alone cannot say which dim is the sequence;
    # the pass tracks it through views and transposes instead. Merging only padding must equal eager.
    model = tiny_hf("bert", layers=2)
    inputs = _bert_inputs([8] * 15 + [6], 16)
    with torch.no_grad():
        ref = model(**inputs)
        fast = ec.effcompile(model, passes=[MergeTokens(r=1)], dynamic=False)
        out = fast(**inputs)
    rec, = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "merge_tokens"]
    assert rec.modified, rec.note
    m = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[m], ref.last_hidden_state[m], rtol=1e-4, atol=1e-5)


def test_spec_name_parses():
    from effcompile.bench.spec import parse_passes

    assert parse_passes("merge_tokens(ratio=0.5)")[1] == [MergeTokens(ratio=0.5)]


@pytest.mark.parametrize("ratio,cos_min,top1", [(0.25, 0.97, 0.85), (0.5, 0.9, 0.7)])
def test_minilm_quality_budget(minilm, ratio, cos_min, top1):
    # Real weights, real text (stdlib docstrings), one static batch; benchmarks/tokens.py has the full tables.
    from effcompile.bench.corpus import retrieval_set

    model, tok = minilm
    queries, docs, _ = retrieval_set(24, 40)
    batch = dict(tok(queries + docs, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    fast = ec.effcompile(model, passes=[MergeTokens(ratio=ratio)], dynamic=False)
    with torch.no_grad():
        ref, out = model(**batch), fast(**batch)
    e_ref = torch.nn.functional.normalize(_pooled(ref, batch["attention_mask"]), dim=-1)
    e_out = torch.nn.functional.normalize(_pooled(out, batch["attention_mask"]), dim=-1)
    cos = (e_ref * e_out).sum(-1)
    agree = ranking_agreement(e_ref[:24] @ e_ref[24:].T, e_out[:24] @ e_out[24:].T)
    assert cos.min() >= cos_min and agree["top1"] >= top1, (cos.min(), agree)


def test_warm_start_from_the_disk_cache_runs_the_merged_graph(tmp_path):
    model = tiny_hf("bert", layers=2)
    inputs = _bert_inputs([20, 13], 20)
    with torch.no_grad():
        first = ec.effcompile(model, passes=[MergeTokens(ratio=0.5)], cache_dir=tmp_path)
        a = first(**inputs).last_hidden_state
        torch._dynamo.reset()
        from effcompile.compiler import backend

        backend._STORES.clear()  # a fresh process: only the disk layer is left
        second = ec.effcompile(model, passes=[MergeTokens(ratio=0.5)], cache_dir=tmp_path)
        b = second(**inputs).last_hidden_state
    graph, = ec.explain(second).graphs
    assert graph.cache == "disk hit", graph.cache_note
    assert torch.equal(a, b)
