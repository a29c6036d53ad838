"""A graph whose passes read the weights runs only on the weights it was compiled for: another model of the same
class, or weights changed in place (load_state_dict), get variants compiled for them, never the old ones."""

import pytest
import torch

import effcompile as ec
from effcompile.testing import tiny_hf

QUANT = [ec.Quantize(weights="int4", group_size=32)]


def _ids(n=7):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))


def _reference(model, ids):
    """What a fresh compile of ``model`` as it is now gives."""
    torch._dynamo.reset()
    with torch.no_grad():
        return ec.effcompile(model, passes=QUANT, cache=False)(ids).logits


def test_two_models_of_one_class_each_run_on_their_own_weights():
    # Dynamo's cache is per code object and does not guard the parameters (graph inputs): the second model's
    # torch.compile reused the first one's graph, and with it the first model's quantized weights (logits off by 38).
    a, b = tiny_hf("llama", seed=0), tiny_hf("llama", seed=1)
    ids = _ids()
    want_a, want_b = _reference(a, ids), _reference(b, ids)
    assert not torch.allclose(want_a, want_b)
    torch._dynamo.reset()
    opts = {"passes": QUANT, "cache": False}
    fast_a = torch.compile(a, backend="effcompile", options=opts)
    fast_b = torch.compile(b, backend="effcompile", options=opts)
    with torch.no_grad():
        torch.testing.assert_close(fast_a(ids).logits, want_a)
        torch.testing.assert_close(fast_b(ids).logits, want_b)
        (graph,) = ec.explain(fast_b).graphs
        assert len(graph.recompiles) == 1 and graph.recompiles[0].startswith("parameters changed (")
        assert "is another tensor): recompiled for the new weights" in graph.recompiles[0]
        for _ in range(2):  # alternating: each set's variants are kept, nothing compiles again
            torch.testing.assert_close(fast_a(ids).logits, want_a)
            torch.testing.assert_close(fast_b(ids).logits, want_b)
        assert len(graph.recompiles) == 1


@pytest.mark.parametrize("form", ["call", "backend"])
def test_weights_changed_in_place_recompile(form):
    # load_state_dict copies into the parameters: the graph made from the old values must not run on.
    model, donor = tiny_hf("llama", seed=0), tiny_hf("llama", seed=2)
    ids = _ids()
    want = _reference(donor, ids)
    torch._dynamo.reset()
    fast = (ec.effcompile(model, passes=QUANT, cache=False) if form == "call"
            else torch.compile(model, backend="effcompile", options={"passes": QUANT, "cache": False}))
    with torch.no_grad():
        before = fast(ids).logits
        model.load_state_dict(donor.state_dict())
        after = fast(ids).logits
    assert not torch.allclose(before, want)
    torch.testing.assert_close(after, want)
    notes = [r for g in ec.explain(fast).graphs for r in g.recompiles]
    assert len(notes) == 1 and "changed in place" in notes[0], notes


def test_exact_passes_do_not_guard_weights():
    # Without a pass that reads the weights nothing is made from them: the parameters stay inputs, no check, no
    # recompile, and the compiled graph follows them as eager does.
    model, donor = tiny_hf("llama", seed=0), tiny_hf("llama", seed=2)
    ids = _ids()
    torch._dynamo.reset()
    fast = ec.effcompile(model, cache=False)
    with torch.no_grad():
        fast(ids)
        model.load_state_dict(donor.state_dict())
        torch.testing.assert_close(fast(ids).logits, donor(ids).logits, rtol=1e-5, atol=1e-5)
    assert [r for g in ec.explain(fast).graphs for r in g.recompiles] == []
