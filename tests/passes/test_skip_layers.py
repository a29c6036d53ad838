"""SkipLayers: config, structure, exactness at num=0, KV-cache decode, methods, MiniLM budgets, bad inputs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import effcompile as ec
from effcompile.compiler.pass_manager import PassFailed
from effcompile.passes.skip_layers import uniform_order
from effcompile.testing import tiny_hf

# Measured on MiniLM-L6 over the minilm_batch sentences (2026-11-26, calibrated on the same batch):
# worst sentence's mean-pooled cosine with one block removed by cosine 0.904, one sublayer by greedy 0.916.
COSINE_1_BLOCK = 0.88
GREEDY_1_SUBLAYER = 0.89


def _root(e: BaseException) -> BaseException:
    """The ValueError a pass raised, under dynamo's BackendCompilerFailed and the PassFailed wrapper."""
    while not isinstance(e, ValueError):
        nxt = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
        if nxt is None:
            return e
        e = nxt
    return e


def _record(fast):
    recs = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "skip_layers"]
    assert len(recs) == 1
    return recs[0]


def _pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=4)


def _ids(n=6, seed=0):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(seed))


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(num=-1), "num"), (dict(num=True), "num"), (dict(unit="head"), "unit"), (dict(method="random"), "method"),
    (dict(speedup=0.5), "speedup"), (dict(layers=("block3",)), "layers"), (dict(num=1, speedup=1.5), "num= or speedup="),
    (dict(num=1, layers=("layers.1",)), "explicit skip set"),
])
def test_bad_config_names_the_field_and_valid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ec.SkipLayers(**kwargs)


def test_calibration_is_needed_only_for_data_driven_choices():
    assert ec.SkipLayers(num=1).needs_calibration and ec.SkipLayers(num=1, method="greedy").needs_calibration
    assert not ec.SkipLayers().needs_calibration  # num=0 skips nothing
    assert not ec.SkipLayers(num=2, method="uniform").needs_calibration
    assert not ec.SkipLayers(layers="layers.1").needs_calibration
    with pytest.raises(ValueError, match="calibration= is required by pass"):
        ec.effcompile(torch.nn.Linear(2, 2), passes=[ec.SkipLayers(num=1)])


def test_uniform_spreads_skips_and_never_takes_the_first():
    names = [f"layers.{i}" for i in range(6)]
    assert uniform_order(names, 1) == ["layers.3"]
    assert uniform_order(names, 2) == ["layers.2", "layers.4"]
    assert uniform_order(names, 5) == names[1:]


# -- structure and numerics on a tiny Llama ---------------------------------------------------------


def test_num_zero_is_exactly_the_exact_pipeline_and_does_not_fire(llama):
    ids = _ids()
    base = ec.effcompile(llama, cache=False)(input_ids=ids).logits
    torch._dynamo.reset()
    fast = ec.effcompile(llama, passes=[ec.SkipLayers(num=0)], cache=False)
    out = fast(input_ids=ids).logits
    assert torch.equal(out, base)
    torch.testing.assert_close(out, llama(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    rec = _record(fast)
    assert not rec.modified and rec.count == 0 and "nothing to skip" in rec.note


def _identity_block(model, i):
    """Eager reference: decoder layer i returns its input."""
    def hook(mod, args, kwargs, out):
        return kwargs.get("hidden_states", args[0] if args else None)
    return model.model.layers[i].register_forward_hook(hook, with_kwargs=True)


def _zero_attn(model, i):
    """Eager reference: layer i's attention adds nothing to the residual stream."""
    def hook(mod, args, out):
        return (torch.zeros_like(out[0]), *out[1:])
    return model.model.layers[i].self_attn.register_forward_hook(hook)


@pytest.mark.parametrize("layers,hook,removed", [
    (("layers.1",), _identity_block, 7),       # q k v o gate up down
    (("layers.2.attn",), _zero_attn, 4),       # q k v o
])
def test_explicit_skip_equals_eager_with_the_unit_bypassed(llama, layers, hook, removed):
    ids = _ids()
    fast = ec.effcompile(llama, passes=[ec.SkipLayers(layers=layers)], cache=False)
    out = fast(input_ids=ids, use_cache=False).logits
    handle = hook(llama, int(layers[0].split(".")[1]))
    try:
        ref = llama(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    rec = _record(fast)
    assert rec.modified and rec.artifacts["skipped"] == list(layers)
    assert all(w.startswith(layers[0]) for w in rec.where) and "skip set by explicit" in rec.note
    # Structure: the skipped unit's linears are gone from the graph that reached codegen.
    from effcompile.compiler import ir
    from effcompile.compiler.pass_manager import PassContext
    from effcompile.passes.skip_layers import skip_layers
    from effcompile.testing import capture

    for use_cache in (False, True):
        torch._dynamo.reset()
        (gm, ex), = capture(llama, input_ids=ids, use_cache=use_cache)
        ir.annotate(gm, ex)
        n_before = sum(ir.target_name(n) == "linear" for n in gm.graph.nodes)
        res = skip_layers(gm, ec.SkipLayers(layers=layers), PassContext(ex))
        gm.graph.lint()
        gone = n_before - sum(ir.target_name(n) == "linear" for n in gm.graph.nodes)
        if use_cache:  # the returned DynamicCache still holds this layer's K and V: said, not hidden
            assert gone == removed - 2 and "graph returns their values" in res.note
        else:
            assert gone == removed and "returns" not in res.note


def test_skipped_attention_keeps_the_static_cache_bookkeeping(llama):
    from transformers import StaticCache

    prompt = _ids(5, seed=1)[:1]
    skip = ec.SkipLayers(layers=("layers.1",))

    def decode(fn, steps=4):
        cache = StaticCache(config=llama.config, max_cache_len=16)
        out = fn(input_ids=prompt, past_key_values=cache, use_cache=True)
        toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps):
            out = fn(input_ids=toks[-1], past_key_values=cache, use_cache=True)
            toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(toks, 1), [int(layer.cumulative_length) for layer in cache.layers]

    fast = ec.effcompile(llama, passes=[skip], cache=False)
    got, lengths = decode(fast)
    handle = _identity_block(llama, 1)
    try:
        ref, _ = decode(llama)
    finally:
        handle.remove()
    assert torch.equal(got, ref)
    assert lengths == [prompt.shape[1] + 4] * 4  # every layer's length advanced, the skipped one too


# -- methods on real weights ----------------------------------------------------------------------


def _embed(fn, batch):
    return _pool(fn(**batch).last_hidden_state, batch["attention_mask"])


def test_cosine_and_greedy_choose_from_calibration_and_meet_budgets(minilm, minilm_batch):
    model, tok = minilm
    calib = [minilm_batch]
    ref = _embed(model, minilm_batch)
    fast = ec.effcompile(model, passes=[ec.SkipLayers(num=1)], calibration=calib, cache=False)
    cos = F.cosine_similarity(_embed(fast, minilm_batch), ref).min().item()
    rec = _record(fast)
    assert set(rec.artifacts["scores"]) == {f"layers.{i}" for i in range(6)}
    best = min(rec.artifacts["scores"], key=rec.artifacts["scores"].get)
    assert rec.artifacts["skipped"] == [best] and "skip set by cosine" in str(ec.explain(fast))
    assert cos >= COSINE_1_BLOCK
    torch._dynamo.reset()
    fast = ec.effcompile(model, passes=[ec.SkipLayers(num=1, unit="sublayer", method="greedy")], calibration=calib,
                         cache=False)
    g = F.cosine_similarity(_embed(fast, minilm_batch), ref).min().item()
    assert g >= GREEDY_1_SUBLAYER
    assert len(_record(fast).where) == 1


def test_speedup_target_removes_just_enough(llama):
    fast = ec.effcompile(llama, passes=[ec.SkipLayers(speedup=1.4, method="uniform")], cache=False)
    fast(input_ids=_ids())
    a = _record(fast).artifacts
    assert a["estimated_speedup"] >= 1.4 and len(a["skipped"]) == 2  # one block of four is est. 1.31x


def test_a_model_without_residual_sublayers_is_left_alone_and_says_why():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    fast = ec.effcompile(mlp, passes=[ec.SkipLayers(num=1, method="uniform")], cache=False)
    x = torch.randn(3, 8)
    assert torch.allclose(fast(x), mlp(x), atol=1e-6)
    rec = _record(fast)
    assert not rec.modified and "no skippable sublayers" in rec.note


# -- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,match", [
    (ec.SkipLayers(num=4, method="uniform"), r"remove every block unit.*valid: 0\.\.3"),
    (ec.SkipLayers(layers=("layers.0", "layers.1", "layers.2", "layers.3")), "remove every sublayer"),
    (ec.SkipLayers(layers=("layers.9",)), r"unknown layer 'layers.9'; valid: \['layers.0'"),
])
def test_bad_skip_sets_are_value_errors_naming_what_is_valid(llama, cfg, match):
    fast = ec.effcompile(llama, passes=[cfg], cache=False)
    with pytest.raises(ValueError) as info:  # what the user catches: a ValueError, not dynamo's wrapper
        fast(input_ids=_ids())
    assert isinstance(info.value, PassFailed) and "skip_layers" in str(info.value)  # names the pass
    assert re.search(match, str(info.value)), str(info.value)
    assert re.search(match, str(_root(info.value.__cause__)))
