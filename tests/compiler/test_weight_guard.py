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
        assert graph.recompiles[0] == ("parameters changed (model.embed_tokens.weight is another tensor): "
                                       "recompiled for the new weights")
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
    assert notes == ["parameters changed (model.embed_tokens.weight changed in place): recompiled for the new weights"]


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


def test_calibrated_fits_follow_weights_changed_in_place():
    # A decode graph has no calibration data of its own: it reuses the fits the prefill graph made for each weight
    # (passes/calibration.calibrated_for). After load_state_dict those fits are for the old values; the recompiled
    # graphs must fit again and agree with a fresh compile on the new weights.
    model, donor = tiny_hf("llama", seed=0), tiny_hf("llama", seed=2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    calib = [{"input_ids": ids}]
    passes = [ec.ThresholdChannels(sparsity=0.5)]

    def generate(fast):
        with torch.no_grad():
            out = fast(input_ids=ids, use_cache=True)  # the calibrated graph; the step's reuses its fits
            step = fast(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        return out.logits, step.logits

    torch._dynamo.reset()
    want = generate(ec.effcompile(donor, passes=passes, calibration=calib, cache=False))
    torch._dynamo.reset()
    fast = ec.effcompile(model, passes=passes, calibration=calib, cache=False)
    generate(fast)
    model.load_state_dict(donor.state_dict())
    got = generate(fast)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_a_step_before_the_calibrated_graph_after_new_weights_says_what_to_do():
    # The decode graph cannot fit by itself; with the old fits gone it says so, naming the way out, rather than use
    # thresholds fitted on the old weights.
    from effcompile.compiler.pass_manager import PassInputError

    model, donor = tiny_hf("llama", seed=0), tiny_hf("llama", seed=2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    fast = ec.effcompile(model, passes=[ec.ThresholdChannels(sparsity=0.5)], calibration=[{"input_ids": ids}],
                         cache=False)
    with torch.no_grad():
        past = fast(input_ids=ids, use_cache=True).past_key_values
        step = ids[:, -1:]
        fast(step, past_key_values=past, use_cache=True)
        model.load_state_dict(donor.state_dict())
        with pytest.raises(Exception, match="weights changed since it was calibrated") as err:
            fast(step, past_key_values=past, use_cache=True)
        assert isinstance(err.value, PassInputError) or isinstance(err.value.__cause__, PassInputError), repr(err.value)
        # Doing what it says works: the prefill refits, then the step compiles with the new fits.
        past = fast(input_ids=ids, use_cache=True).past_key_values
        got = fast(step, past_key_values=past, use_cache=True).logits
    torch._dynamo.reset()
    with torch.no_grad():
        fresh = ec.effcompile(donor, passes=[ec.ThresholdChannels(sparsity=0.5)], calibration=[{"input_ids": ids}],
                              cache=False)
        want = fresh(step, past_key_values=fresh(input_ids=ids, use_cache=True).past_key_values, use_cache=True).logits
    torch.testing.assert_close(got, want)


def test_a_model_built_under_inference_mode_compiles_with_passes_that_read_weights():
    # Inference tensors keep no version counter (reading _version raises): the memos and the parameter check treat
    # them as never changed in place. Quantize failed on such a model before.
    ids = _ids()
    want = _reference(tiny_hf("llama", seed=0), ids)
    torch._dynamo.reset()
    with torch.inference_mode():
        model = tiny_hf("llama", seed=0)
        assert next(model.parameters()).is_inference()
        fast = ec.effcompile(model, passes=QUANT, cache=False)
        torch.testing.assert_close(fast(ids).logits, want)
        torch.testing.assert_close(fast(ids).logits, want)
    assert [r for g in ec.explain(fast).graphs for r in g.recompiles] == []


def test_explain_lists_only_the_backend_graphs_still_alive():
    # explain() finds a torch.compile'd model's graphs by the parameters they read: once dynamo has dropped a graph
    # (a reset), it is no longer listed with the new one.
    import gc

    model = tiny_hf("llama", seed=0)
    torch._dynamo.reset()
    opts = {"passes": QUANT, "cache": False}
    with torch.no_grad():
        torch.compile(model, backend="effcompile", options=opts)(_ids())
        assert len(ec.explain(torch.compile(model, backend="effcompile", options=opts)).graphs) == 1
        torch._dynamo.reset()
        gc.collect()
        fast = torch.compile(model, backend="effcompile", options=opts)
        fast(_ids(5))
    assert len(ec.explain(fast).graphs) == 1
