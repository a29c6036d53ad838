"""RemoveUnusedFactories: tensor factories nobody reads are dropped; in-place calls and read factories stay."""

from __future__ import annotations

import torch

import effcompile as ec
from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext, PassManager
from effcompile.passes.remove_unused_factories import RemoveUnusedFactories
from effcompile.testing import capture, tiny_hf


def _f(x, counter):
    unused = torch.arange(4)  # noqa: F841 - the dead factory
    torch.zeros_like(x)  # dead too
    counter.add_(1)  # in place, no readers: must stay
    pos = torch.arange(x.shape[-1]) + counter
    return x * pos


def _run(fn, *args):
    gm, example = capture(fn, *args)[0]
    ir.annotate(gm, example)
    (rec,) = PassManager([RemoveUnusedFactories()]).run(gm, PassContext(example))
    return gm, example, rec


def test_dead_factories_go_and_in_place_calls_stay():
    x, counter = torch.randn(2, 5), torch.tensor(3)
    gm, example, rec = _run(_f, x, counter)
    assert rec.modified and rec.count == 2
    names = [ir.target_name(n) for n in gm.graph.nodes]
    assert names.count("arange") == 1 and "zeros_like" not in names and "add_" in names
    c_eager, c_graph = torch.tensor(3), torch.tensor(3)
    assert torch.equal(gm(x, c_graph)[0], _f(x, c_eager)) and int(c_graph) == int(c_eager) == 4


def test_nothing_dead_is_a_no_op():
    gm, _, rec = _run(lambda x: torch.arange(x.shape[-1]) * x, torch.randn(3))
    assert not rec.modified and rec.count == 0


def test_decode_step_drops_the_mask_codes_unread_aranges():
    from transformers import StaticCache

    llama = tiny_hf("llama", layers=1, hidden=64, heads=4)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=llama.config, max_cache_len=8)
    fast = ec.effcompile(llama, cache=False)
    with torch.no_grad():
        llama(input_ids=ids, past_key_values=cache, use_cache=True)
        fast(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([4]))
    recs = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "remove_unused_factories"]
    assert any(r.modified for r in recs), recs
