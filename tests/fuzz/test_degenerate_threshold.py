"""Fuzz: ThresholdChannels at sparsity 0 (and with every threshold at -1) changes nothing, on random tiny HF models."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effcompile as ec
from effcompile.passes.threshold_channels import thresholds
from effcompile.testing import tiny_hf

FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VOCAB = 96


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["llama", "bert", "gpt2"]))
    heads = draw(st.sampled_from([2, 4]))
    hidden = heads * draw(st.sampled_from([8, 12, 20]))  # odd-ish widths
    return dict(kind=kind, layers=draw(st.integers(1, 2)), hidden=hidden, heads=heads,
                seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(1, 3)), seq=draw(st.integers(2, 12)))


def _out(fn, x):
    with torch.no_grad():
        out = fn(**x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _compile(model, passes, calib):
    torch._dynamo.reset()
    return ec.effcompile(model, passes=passes, calibration=calib, cache=False)


@settings(max_examples=6, **FUZZ)
@given(case=cases())
def test_sparsity_zero_and_minus_one_thresholds_change_nothing(case):
    model = tiny_hf(case["kind"], layers=case["layers"], hidden=case["hidden"], heads=case["heads"], vocab=VOCAB,
                    seed=case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    x = {"input_ids": torch.randint(0, VOCAB, (case["batch"], case["seq"]), generator=g)}
    if case["kind"] != "bert":
        x["use_cache"] = False
    calib = [dict(x)]
    eager = _out(model, x)
    dense = _out(_compile(model, None, None), x)
    zero = _compile(model, [ec.ThresholdChannels(sparsity=0.0)], calib)
    out = _out(zero, x)
    assert torch.equal(out, dense), case  # nothing inserted: the exact pipeline, bit for bit
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)  # the exact pipeline's bound vs eager
    # At a real sparsity with every threshold at -1 (keep everything) the result is dense again: the
    # inserted ops and the buffers are neutral. GPT-2's Conv1D is addmm, not linear: nothing to target.
    half = _compile(model, [ec.ThresholdChannels(sparsity=0.5)], calib)
    _out(half, x)
    bufs = thresholds(half)
    assert (len(bufs) > 0) == (case["kind"] != "gpt2"), (case, list(bufs))
    for b in bufs.values():
        b.fill_(-1.0)
    torch.testing.assert_close(_out(half, x), dense, rtol=1e-5, atol=1e-5)
