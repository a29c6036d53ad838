"""FuseCacheWrites: a layer's K/V cache update (positions, counter, two index copies) becomes one op (exact)."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.passes.fuse_cache_writes import FuseCacheWrites
from effcompile.passes.fuse_rope_cache_write import FuseRopeCacheWrite
from effcompile.testing import tiny_hf


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "fuse_cache_writes"]


def _targets(fast) -> list[str]:
    return [str(n.target) for g in ec.explain(fast).graphs for gm in g.graph_modules() for n in gm.graph.nodes]


def _decode(model, passes, steps=3):
    """Logits of three decode steps after an eager prefill, and the caches they leave."""
    from transformers import StaticCache

    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=12)
    fast = ec.effcompile(model, passes=passes, cache=False)
    logits = []
    with torch.no_grad():
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for step in range(steps):
            out = fast(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([5 + step]))
            tok = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits)
    layers = [(lay.keys, lay.values, lay.cumulative_length) for lay in cache.layers]
    return fast, torch.cat(logits), layers


@pytest.fixture
def interpret(monkeypatch):
    """Lower as for a GPU (Triton interpreted): the fused op becomes the one-kernel update."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_decode_cache_updates_fuse_per_layer_and_match_eager_bitwise(interpret):
    llama = tiny_hf("llama", layers=2, hidden=64, heads=4)
    alone = FuseRopeCacheWrite(enabled=False)  # else k's rotary embedding joins the write (its own test)
    fast, got, got_cache = _decode(llama, [alone])  # the default pipeline otherwise
    plain, want, want_cache = _decode(llama, [FuseCacheWrites(enabled=False), alone])
    (rec,) = [r for r in _record(fast) if r.modified]
    assert rec.count == 2 and rec.where == ["layers.0.attn", "layers.1.attn"]
    targets, before = _targets(fast), _targets(plain)
    assert targets.count("effcompile.cache_write.default") == 2
    assert "index_copy_" not in targets and before.count("index_copy_") == 4
    assert before.count("add_") - targets.count("add_") == 2  # the counters advance inside the op
    assert torch.equal(got, want)
    for g, w in zip(got_cache, want_cache, strict=True):
        for a, b in zip(g, w, strict=True):
            assert torch.equal(a, b)
    assert int(got_cache[0][2]) == 5 + 3  # prefill + three steps


def _counter_update(keys, values, length, k, v):
    pos = torch.arange(1) + length
    length.add_(1)
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)
    return keys.sum()


def _explicit_positions(keys, values, pos, k, v):
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)
    return values.sum()


def _counter_read_before_copy(keys, values, length, k, v):
    pos = torch.arange(1) + length
    length.add_(1)
    seen = length * 2  # reads the advanced counter before the copies
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)
    return seen


def _cache_read_between_copies(keys, values, length, k, v):
    pos = torch.arange(1) + length
    length.add_(1)
    keys.index_copy_(2, pos, k)
    snapshot = keys.sum() + values.sum()  # values not yet written
    values.index_copy_(2, pos, v)
    return snapshot


def _args(explicit=False):
    g = torch.Generator().manual_seed(3)
    keys, values = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)
    k, v = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    return [keys, values, torch.tensor([2]) if explicit else torch.tensor(2), k, v]


def _run_both(fn, explicit=False):
    """(compiled result, eager result, compiled inputs after, eager inputs after, compiled fn)."""
    got_args, want_args = _args(explicit), _args(explicit)
    fast = ec.effcompile(fn, cache=False)
    got, want = fast(*got_args), fn(*want_args)
    return got, want, got_args, want_args, fast


def test_without_triton_on_cpu_the_update_is_lowered_back_to_the_torch_ops():
    # A custom-op call around the same torch ops only costs dispatch on CPU: the pass fires (the IR is the
    # same everywhere), codegen puts the ops back and says so.
    llama = tiny_hf("llama", layers=2, hidden=64, heads=4)
    fast, got, got_cache = _decode(llama, None)
    plain, want, want_cache = _decode(llama, [FuseCacheWrites(enabled=False)])
    assert [r.count for r in _record(fast) if r.modified] == [2]
    targets = _targets(fast)
    assert "effcompile.cache_write.default" not in targets and targets.count("index_copy_") == 4
    assert any("K/V cache write" in what for g in ec.explain(fast).graphs for what, _ in g.fallbacks)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for g, w in zip(got_cache, want_cache, strict=True) for a, b in zip(g, w, strict=True))


def test_functions_fuse_with_a_counter_or_with_given_positions(interpret):
    for fn, explicit, kind in ((_counter_update, False, "length"), (_explicit_positions, True, "position")):
        got, want, got_args, want_args, fast = _run_both(fn, explicit)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(got_args, want_args, strict=True))
        (rec,) = _record(fast)
        assert rec.modified and rec.count == 1, kind
        (node,) = [n for g in ec.explain(fast).graphs for gm in g.graph_modules() for n in gm.graph.nodes
                   if str(n.target) == "effcompile.cache_write.default"]
        assert (node.args[5] is not None) == (kind == "length")  # the counter folded in, or positions given


def test_a_counter_read_after_its_increment_keeps_it_outside_the_op(interpret):
    got, want, got_args, want_args, fast = _run_both(_counter_read_before_copy)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_args, want_args, strict=True))
    (rec,) = _record(fast)
    assert rec.modified  # the copies still fuse, reading the positions computed outside
    assert "add_" in _targets(fast)


def test_a_cache_read_between_the_copies_is_left_alone():
    got, want, got_args, want_args, fast = _run_both(_cache_read_between_copies)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_args, want_args, strict=True))
    (rec,) = _record(fast)
    assert not rec.modified and "read between its two copies" in rec.note
    assert _targets(fast).count("index_copy_") == 2
