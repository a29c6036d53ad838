"""IR: metadata and sublayer tags on real HF graphs (MiniLM, Llama, GPT-2), stable across retraces."""

import collections

import pytest
import torch

from effcompile.compiler import ir
from effcompile.testing import capture, tiny_hf


def _tags(gm):
    return collections.Counter((str(n.meta[ir.TAG]), n.meta[ir.TAG].kind) for n in gm.graph.nodes if n.op != "output")


def _annotated(model, **inputs):
    graphs = capture(model, **inputs)
    assert len(graphs) == 1, "these HF models capture as one graph"
    gm, example = graphs[0]
    ir.annotate(gm, example)
    return gm


@pytest.mark.parametrize("kind,layers", [("llama", 3), ("gpt2", 2), ("bert", 2)])
def test_every_block_has_attn_ffn_norms_and_two_residuals(kind, layers):
    model = tiny_hf(kind, layers=layers)
    gm = _annotated(model, input_ids=torch.randint(0, 128, (2, 9)))
    tags = _tags(gm)
    for i in range(layers):
        for part in ("attn", "ffn"):
            assert tags[(f"layers.{i}.{part}", "op")] > 0, (kind, i, part)
            assert tags[(f"layers.{i}.{part}", "residual")] == 1, (kind, i, part, tags)
            assert tags[(f"layers.{i}.{part}", "norm")] >= 1, (kind, i, part, tags)
    assert not any(k[0].startswith(f"layers.{layers}") for k in tags)
    ir.check_invariants(gm)


def test_minilm_tags_embedding_blocks_and_head(minilm, minilm_batch):
    model, _ = minilm
    gm = _annotated(model, **minilm_batch)
    names = {k[0] for k in _tags(gm)}
    assert {f"layers.{i}.{p}" for i in range(6) for p in ("attn", "ffn")} <= names
    assert "embedding" in names and "head" in names
    # Post-LN BERT: the residual add and the LayerNorm after it close each sublayer.
    residuals = [n for n in gm.graph.nodes if n.op != "output" and n.meta[ir.TAG].kind == "residual"]
    assert len(residuals) == 12
    assert all(ir.target_name(n) == "add" for n in residuals)


def test_tags_are_stable_across_retraces():
    model = tiny_hf("llama", layers=2)
    ids = torch.randint(0, 128, (1, 7))
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        gm = _annotated(model, input_ids=ids)
        runs.append([(n.name, str(n.meta.get(ir.TAG)), getattr(n.meta.get(ir.TAG), "kind", None))
                     for n in gm.graph.nodes])
    assert runs[0] == runs[1]


def test_fingerprint_changes_with_structure_not_with_weights():
    def f(x, w):
        return torch.nn.functional.gelu(x @ w)

    def g(x, w):
        return torch.relu(x @ w)

    x, w = torch.randn(3, 4), torch.randn(4, 4)
    fa = ir.fingerprint(capture(f, x, w)[0][0])
    assert fa == ir.fingerprint(capture(f, x, torch.randn(4, 4))[0][0])
    assert fa != ir.fingerprint(capture(g, x, w)[0][0])


def test_meta_val_present_after_annotate_and_invariants_catch_missing():
    gm, example = capture(lambda x: torch.softmax(x * 2, -1), torch.randn(2, 5))[0]
    ir.annotate(gm, example)
    ir.check_invariants(gm)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta["val"]
    node.meta.pop("example_value", None)
    with pytest.raises(ir.InvariantError, match=node.name):
        ir.check_invariants(gm)


def test_a_single_layer_model_still_has_a_block():
    gm = _annotated(tiny_hf("llama", layers=1), input_ids=torch.randint(0, 128, (1, 6)))
    tags = _tags(gm)
    assert tags[("layers.0.attn", "residual")] == 1 and tags[("layers.0.ffn", "residual")] == 1


def test_an_indexed_sequential_is_not_mistaken_for_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    graphs = capture(model, torch.randn(2, 4))
    gm, example = graphs[0]
    ir.annotate(gm, example)
    assert all(n.meta[ir.TAG].block is None for n in gm.graph.nodes if n.op != "output")


def test_drop_unused_attrs_erases_a_node_listed_twice_once():
    # FuseParallelLinears lists each fused linear's attributes; q / k / v share one threshold, so it came three
    # times and fx warned "erase_node on an already erased node" twice per fused group.
    import warnings

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("t", torch.ones(2))

        def forward(self, x):
            return x + self.t

    gm = torch.fx.symbolic_trace(M())
    (attr,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    add = next(iter(attr.users))
    add.replace_input_with(attr, add.args[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ir.drop_unused_attrs(gm, [attr, attr, attr])
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"] and "t" not in dict(gm.named_buffers())


def test_shared_tensors_are_made_once_while_held_and_keep_passed_through_inputs_named():
    from effcompile.compiler import ir

    shared, w, s = {}, torch.randn(4, 3), torch.randn(4)
    calls = []

    def make():
        calls.append(1)
        return w.t().contiguous(), s  # s passed through unchanged, as int8 scales are

    def key():
        return ("k", ir.tensor_key(w), ir.tensor_key(s))

    wt, st = ir.shared_tensors(shared, "space", key(), make, hold=(w, s))
    assert st is s and not hasattr(s, "_ec_made_from")  # an input keeps its id key: the next lookup matches
    again = ir.shared_tensors(shared, "space", key(), make, hold=(w, s))
    assert again[0] is wt and len(calls) == 1
    assert ir.tensor_key(wt) == ("space", key(), 0)  # what a stack of it is keyed by
    del wt, again
    fresh = ir.shared_tensors(shared, "space", key(), make, hold=(w, s))  # nothing held it: made again
    assert len(calls) == 2 and torch.equal(fresh[0], w.t())
    w.add_(1)  # changed in place: a new key, a new copy
    assert torch.equal(ir.shared_tensors(shared, "space", key(), make, hold=(w, s))[0], w.t()) and len(calls) == 3


def test_loaded_tensors_from_one_blob_become_one_unless_changed_in_place():
    # A warm start's graphs each read their own copy of a blob; the copies of one blob (by the SHA-256 the cache
    # checked) become the first one loaded, held weakly, and not once that one was changed in place.
    shared: dict = {}
    w = torch.randn(300, 70)
    first = {"a": w.clone(), "small": torch.ones(3)}
    assert ir.share_loaded_tensors(shared, first, {"a": "sha-w"}) == 0
    second = {"same": w.clone(), "other": w.clone(), "small": torch.ones(3)}
    before = dict(second)
    assert ir.share_loaded_tensors(shared, second, {"same": "sha-w", "other": "sha-other"}) == w.numel() * 4
    assert second["same"] is first["a"]
    assert second["other"] is before["other"] and second["small"] is before["small"]  # another blob; not a blob
    first["a"].add_(1)  # changed in place: no longer what blob sha-w holds
    third = {"same": w.clone()}
    kept = third["same"]
    assert ir.share_loaded_tensors(shared, third, {"same": "sha-w"}) == 0 and third["same"] is kept
    del first, second, before  # held weakly: once no graph holds it, the next load keeps its own
    fourth = {"same": w.clone()}
    kept = fourth["same"]
    del third
    assert ir.share_loaded_tensors(shared, fourth, {"same": "sha-w"}) == 0 and fourth["same"] is kept


def test_loaded_tensor_is_the_memos_while_alive_and_unchanged():
    shared: dict = {}
    first = {"a": torch.randn(4, 3)}
    assert ir.loaded_tensor(shared, "sha-w") is None
    ir.share_loaded_tensors(shared, first, {"a": "sha-w"})
    assert ir.loaded_tensor(shared, "sha-w") is first["a"] and ir.loaded_tensor(shared, "sha-x") is None
    first["a"].mul_(2)  # no longer the blob's bytes
    assert ir.loaded_tensor(shared, "sha-w") is None


def test_blob_tensors_move_to_their_device_once_per_compiled_model():
    # A CUDA warm start moved each graph's tensors to the GPU on its own: one device copy of every packed weight per
    # graph. "meta" stands in for the GPU here: .to() makes a new tensor, as a CPU -> CUDA copy does.
    shared: dict = {}
    w, small = torch.randn(8, 5), torch.ones(2)
    prefill = ir.place_loaded_tensors(shared, {"w": w, "s": small}, {"w": "sha-w"}, {"w": "meta", "s": "meta"})
    decode = ir.place_loaded_tensors(shared, {"w": w, "s": small}, {"w": "sha-w"}, {"w": "meta", "s": "meta"})
    assert prefill["w"].device.type == "meta" and decode["w"] is prefill["w"]
    assert prefill["s"] is small and decode["s"] is small  # not a blob: graph_from_json moves it as before
    on_cpu = ir.place_loaded_tensors(shared, {"w": w}, {"w": "sha-w"}, {"w": "cpu"})
    assert on_cpu["w"] is w  # already where its graph runs
    entry = {"w": w}
    ir.place_loaded_tensors(shared, entry, {"w": "sha-w"}, {"w": "meta"})
    assert entry["w"] is w  # a new dict: the store's in-memory layer keeps the CPU tensors
    prefill["w"].add_(1)  # a device copy changed in place is not handed out again
    again = ir.place_loaded_tensors(shared, {"w": w}, {"w": "sha-w"}, {"w": "meta"})
    assert again["w"] is not prefill["w"] and again["w"].device.type == "meta"
    bad = ir.place_loaded_tensors(shared, {"w": w}, {"w": "sha-w"}, {"w": "nodevice:0"})
    assert bad["w"] is w  # left for graph_from_json to name
