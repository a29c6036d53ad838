"""Degenerate layer skipping on random tiny HF models: SkipLayers(num=0) and a never-exiting EarlyExit
change nothing, and a skip set that is applied keeps every output's structure and shape."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effcompile as ec
from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext
from effcompile.passes.early_exit import EarlyExit, early_exit
from effcompile.passes.skip_layers import find_units, skip_layers
from effcompile.testing import capture, tiny_hf

FUZZ = settings(max_examples=3, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

models = st.tuples(st.sampled_from(["llama", "gpt2", "bert"]), st.integers(2, 3), st.sampled_from([32, 64]),
                   st.integers(0, 2**16), st.integers(1, 3), st.integers(3, 9))


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for y in x for t in _flat(y)]
    return []


@FUZZ
@given(models)
def test_num_zero_and_never_exit_equal_eager_exactly(spec):
    kind, layers, hidden, seed, batch, seq = spec
    model = tiny_hf(kind, layers=layers, hidden=hidden, seed=seed)
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
    kw = {"input_ids": ids} if kind == "bert" else {"input_ids": ids, "use_cache": False}
    with torch.no_grad():
        eager = model(**kw)
    (gm, ex), = capture(model, dynamic=False, **kw)  # static: each example is a fresh shape
    ir.annotate(gm, ex)
    ref = _flat(gm(*ex))
    assert not skip_layers(gm, ec.SkipLayers(num=0), PassContext(ex)).modified
    res = early_exit(gm, EarlyExit(threshold=2.0), PassContext(ex))
    assert res.modified and res.where == [f"layers.{i}" for i in range(layers - 1)]
    out = _flat(gm(*ex))
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    first = eager.logits if kind != "bert" else eager.last_hidden_state
    assert torch.equal(out[0], first)


@FUZZ
@given(models, st.data())
def test_a_skip_set_keeps_the_output_structure(spec, data):
    kind, layers, hidden, seed, batch, seq = spec
    model = tiny_hf(kind, layers=layers, hidden=hidden, seed=seed)
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
    kw = {"input_ids": ids} if kind == "bert" else {"input_ids": ids, "use_cache": False}
    (gm, ex), = capture(model, dynamic=False, **kw)  # static: each example is a fresh shape
    ir.annotate(gm, ex)
    ref = _flat(gm(*ex))
    units, why = find_units(gm)
    assert not why and len(units) == 2 * layers  # every attn and ffn of these models can be bypassed
    skip = data.draw(st.sampled_from(sorted(units)), label="skip")
    res = skip_layers(gm, ec.SkipLayers(layers=(skip,)), PassContext(ex))
    gm.graph.lint()
    out = _flat(gm(*ex))
    assert res.where == [skip] and [t.shape for t in out] == [t.shape for t in ref]
    assert not torch.equal(out[0], ref[0])  # it fired: the output moved
