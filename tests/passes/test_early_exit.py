"""EarlyExit: never-exit equals eager, an exit equals the truncated model, KV fill, rules, bad inputs."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.compiler import ir
from effcompile.compiler.pass_manager import PassContext
from effcompile.passes.early_exit import EarlyExit, early_exit
from effcompile.testing import capture, tiny_hf


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=4)


def _ids(n=6, rows=2, seed=0):
    return torch.randint(0, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _graph(model, *args, **inputs):
    (gm, ex), = capture(model, *args, **inputs)
    ir.annotate(gm, ex)
    return gm, ex


def _truncated(model, keep: int, **inputs):
    """Eager reference: layers after ``keep`` return their input (the model's own norm and head follow)."""
    def hook(mod, args, kwargs, out):
        return kwargs.get("hidden_states", args[0] if args else None)
    hs = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers[keep + 1:]]
    try:
        return model(**inputs).logits
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("kwargs,field", [
    (dict(exits=(-1,)), "exits"), (dict(rule="entropy"), "rule"), (dict(granularity="token"), "granularity"),
    (dict(threshold=-0.1), "threshold"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EarlyExit.{field}"):
        EarlyExit(**kwargs)


def test_never_exiting_equals_eager_exactly_and_partitions_the_graph(llama):
    ids = _ids()
    gm, ex = _graph(llama, input_ids=ids, use_cache=False)
    res = early_exit(gm, EarlyExit(threshold=2.0), PassContext(ex))
    gm.graph.lint()
    assert res.modified and res.where == ["layers.0", "layers.1", "layers.2"] and "4 partitions" in res.note
    assert torch.equal(gm(*ex)[0], llama(input_ids=ids, use_cache=False).logits)
    assert gm._ec_early_exit.counts == {"full": 2}
    # The top-level graph is one scheduler call: no op of the model is left outside the partitions.
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and ir.target_name(n) == "linear"]


@pytest.mark.parametrize("exit_at", [0, 2])
def test_an_exit_is_the_truncated_model_through_its_own_norm_and_head(llama, exit_at):
    ids = _ids()
    fast = ec.effcompile(llama, passes=[EarlyExit(exits=(exit_at,), threshold=0.0)])
    out = fast(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, _truncated(llama, exit_at, input_ids=ids, use_cache=False), atol=0, rtol=0)
    rep = str(ec.explain(fast))
    assert f"exits after layers.{exit_at} by confidence" in rep
    assert "not cacheable" in rep  # the scheduler holds partitions, not tensors: said, not hidden


def test_thresholds_are_read_at_run_time_no_recompile_per_depth(llama):
    gm, ex = _graph(llama, input_ids=_ids(), use_cache=False)
    early_exit(gm, EarlyExit(rule="saturation", threshold=2.0), PassContext(ex))
    sched = gm._ec_early_exit
    depths = []
    for thr in (2.0, 0.0, 0.5):  # the same partitions serve every depth
        sched.threshold = thr
        sched.counts.clear()
        gm(*ex)
        depths.append(dict(sched.counts))
    assert depths[0] == {"full": 2} and depths[1] == {"layers.0": 2}


def test_per_sequence_exits_take_each_row_from_its_own_exit(llama):
    ids = _ids(rows=3)
    gm, ex = _graph(llama, input_ids=ids, use_cache=False)
    early_exit(gm, EarlyExit(exits=(1,), threshold=0.0, granularity="sequence"), PassContext(ex))
    out = gm(*ex)[0]
    torch.testing.assert_close(out, _truncated(llama, 1, input_ids=ids, use_cache=False))
    assert gm._ec_early_exit.counts == {"layers.1": 3}


def test_exiting_fills_the_skipped_layers_kv_cache(llama):
    from transformers import StaticCache

    prompt = _ids(rows=1)
    fast = ec.effcompile(llama, passes=[EarlyExit(exits=(1,), threshold=0.0)], cache=False)
    cache = StaticCache(config=llama.config, max_cache_len=16)
    fast(input_ids=prompt, past_key_values=cache, use_cache=True)
    fast(input_ids=prompt[:, :1], past_key_values=cache, use_cache=True)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [7] * 4  # bookkeeping once per layer
    for layer in cache.layers[2:]:  # layers after the exit: KV written from the exit state, not left zero
        assert layer.keys[0, :, :7].abs().sum(-1).gt(0).all()


def test_exit_points_past_the_last_layer_name_the_valid_ones(llama):
    gm, ex = _graph(llama, input_ids=_ids(), use_cache=False)
    with pytest.raises(ValueError, match=r"\[3\] not an exit point of this model; valid: \[0, 1, 2\]"):
        early_exit(gm, EarlyExit(exits=(1, 3)), PassContext(ex))
    with pytest.raises(ValueError, match=r"\[9\] not an exit point"):
        early_exit(gm, EarlyExit(exits=(9,)), PassContext(ex))


def test_a_model_without_blocks_is_left_alone():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    gm, ex = _graph(mlp, torch.randn(2, 8))
    res = early_exit(gm, EarlyExit(), PassContext(ex))
    assert not res.modified and "nothing to exit early from" in res.note
