"""Bench harness: pass-spec parser, record structure on tiny models, failed variants, Pareto front, tables."""

import dataclasses
import json
import math
from typing import ClassVar

import pytest
import torch

from effcompile.bench import harness, report, spec
from effcompile.bench.zoo import ZooModel
from effcompile.compiler import pass_manager as pm
from effcompile.passes import Quantize, RemoveDropout

# Small quality and decode workloads: the structure is what these tests check, not the numbers.
FAST = dict(batch=2, seq=16, reps=2, inductor=False, decode_batches=(1, 2), decode_steps=2, decode_warmup=1,
            prompt_len=8, lm_window=16, lm_windows=2, new_tokens=2, n_queries=8, n_docs=16, cache=False)


# ----------------------------------------------------------------------------- spec parser
def test_parse_valid_spec():
    label, configs = spec.parse_passes("quantize(weights=int4, group_size=64)+remove_dropout")
    assert configs == [Quantize(weights="int4", group_size=64), RemoveDropout()]
    assert label == "quantize(weights=int4,group_size=64)+remove_dropout"
    assert spec.parse_passes("quantize(targets=(attn,))")[1] == [Quantize(targets=("attn",))]
    assert spec.parse_passes("quantize(group_size=None)")[1] == [Quantize()]


@pytest.mark.parametrize("text", ["none", "", "  ", "None", None])
def test_none_is_the_dense_baseline(text):
    assert spec.parse_passes(text) == ("none", [])


def test_scalar_values():
    assert [spec._scalar(t) for t in ("64", "0.5", "1e-3", "true", "False", "None", "int4", "'8'")] == \
        [64, 0.5, 1e-3, True, False, None, "int4", "8"]


def test_unknown_pass_lists_valid_names():
    with pytest.raises(spec.SpecError, match="unknown pass 'quantise'") as e:
        spec.parse_passes("quantise(weights=int4)")
    assert "quantize" in str(e.value) and "remove_dropout" in str(e.value)


def test_unknown_field_lists_fields():
    with pytest.raises(spec.SpecError, match="quantize has no field 'bits'") as e:
        spec.parse_passes("quantize(bits=4)")
    assert "weights, group_size, targets" in str(e.value)


def test_bad_value_shows_the_configs_error():
    with pytest.raises(spec.SpecError, match=r"quantize\(weights=int3\): Quantize.weights='int3' is not supported"):
        spec.parse_passes("quantize(weights=int3)")
    with pytest.raises(spec.SpecError, match="group_size=64 is not supported for weights='int8'"):
        spec.parse_passes("quantize(group_size=64)")


@pytest.mark.parametrize("text, match", [("quantize(weights=int4", "unclosed"), ("quantize(int4)", "not field=value"),
                                         ("quantize(weights=[int8,int4])", "sweep axes"),
                                         ("quantize(weights=int8,weights=int4)", "given twice")])
def test_malformed_specs(text, match):
    with pytest.raises(spec.SpecError, match=match):
        spec.parse_passes(text)


def test_spec_name_alias(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class MaskChannels(pm.PassConfig):
        sparsity: float = 0.0
        lossy: ClassVar[bool] = True
        spec_name: ClassVar[str] = "mask"

        def __post_init__(self):
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"MaskChannels.sparsity={self.sparsity!r} must be in [0, 1)")

    entry = pm.RegisteredPass(MaskChannels, lambda gm, cfg, ctx: pm.PassResult(False), "mask_channels",
                              "semantic", 1, (), ())
    monkeypatch.setitem(pm._REGISTRY, MaskChannels, entry)
    configs = spec.parse_passes("mask(sparsity=0)+mask_channels(sparsity=0.5)")[1]
    assert configs == [MaskChannels(sparsity=0.0), MaskChannels(sparsity=0.5)]
    assert isinstance(configs[0].sparsity, float)  # a float field gets 0.0, not the int 0
    with pytest.raises(spec.SpecError, match="must be in"):
        spec.parse_passes("mask(sparsity=1.5)")
    assert {"mask", "mask_channels"} <= set(spec.pass_names())


def test_snake_case():
    assert [spec.snake_case(n) for n in ("Quantize", "RemoveDropout", "INT8Quant", "SkipLayers")] == \
        ["quantize", "remove_dropout", "int8_quant", "skip_layers"]


def test_expand_sweep_grid_and_invalid_points():
    points, invalid = spec.expand_sweep("quantize(weights=[int8,int4],group_size=[32,128])")
    assert [p for p, _ in points] == ["quantize(weights=int4,group_size=32)", "quantize(weights=int4,group_size=128)"]
    assert [p for p, _ in invalid] == ["quantize(weights=int8,group_size=32)", "quantize(weights=int8,group_size=128)"]
    assert "not supported for weights='int8'" in invalid[0][1]
    with pytest.raises(spec.SpecError, match="no \\[a,b\\] list"):
        spec.expand_sweep("quantize(weights=int4,group_size=32)")


# ----------------------------------------------------------------------------- records
def _numbers_only_where_measured(obj, path=""):
    """No NaN/inf anywhere, and a failed or skipped entry carries no numbers beside its reason."""
    if isinstance(obj, dict):
        if "failed" in obj or "skipped" in obj:
            assert set(obj) == {"failed"} or set(obj) == {"skipped"}, f"{path}: {obj}"
        for k, v in obj.items():
            _numbers_only_where_measured(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _numbers_only_where_measured(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), path


def test_record_on_tiny_llama():
    rec = harness.run("llama-tiny", "quantize(weights=int8)", harness.BenchSettings(**FAST))
    json.dumps(rec, allow_nan=False)
    _numbers_only_where_measured(rec)
    assert rec["model"] == "llama-tiny" and rec["task"] == "causal-lm" and rec["seed"] == 0
    assert rec["passes"] == {"spec": "quantize(weights=int8)", "configs": [{
        "pass": "quantize", "type": "Quantize", "lossy": True,
        "fields": {"weights": "int8", "group_size": None, "targets": ["attn", "ffn"], "activations": "none",
                   "smooth": None, "eora_rank": 0}}]}
    assert {"torch", "triton", "transformers", "effcompile"} <= set(rec["versions"])
    q = rec["quality"]
    assert q["metric"] == "perplexity" and not q["higher_is_better"]
    assert q["recovery"] == pytest.approx(q["base"] / q["optimized"]) and 0.9 < q["recovery"] < 1.1
    assert {"perplexity_ref", "perplexity_out", "logits", "next_token", "greedy"} <= set(q["details"])
    pre = rec["speed"]["prefill"]
    assert pre["eager"]["median_ms"] > 0 and pre["effcompile"]["median_ms"] > 0
    assert pre["inductor"] == {"skipped": "inductor disabled"}
    assert pre["effcompile"]["memory"]["method"] in ("cpu", "cpu-maxrss")
    d1, d2 = rec["speed"]["decode"]["batch1"], rec["speed"]["decode"]["batch2"]
    art = rec["effcompile"]["artifacts"][0]
    saved = art["bytes_dense"] - art["bytes_quantized"]
    assert saved > 0
    for d, b in ((d1, 1), (d2, 2)):
        e = d["effcompile"]
        assert e["tokens_per_s"] == pytest.approx(b * 1e3 / e["ms_per_step"])
        assert e["bytes_per_step"] == e["weight_bytes_per_step"] + e["kv_bytes_per_step"]
        assert e["gb_per_s"] == pytest.approx(e["bytes_per_step"] / e["ms_per_step"] * 1e3 / 1e9)
        # Bandwidth counts the packed int8 weights the quantized graph reads, not the dense ones.
        assert e["weight_bytes_per_step"] == d["eager"]["weight_bytes_per_step"] - saved
    assert d2["eager"]["kv_bytes_per_step"] == 2 * d1["eager"]["kv_bytes_per_step"]
    assert isinstance(rec["ratios"]["prefill_speedup_vs_eager"], float)
    assert isinstance(rec["ratios"]["decode_batch1_speedup_vs_eager"], float)
    assert rec["ratios"]["prefill_speedup_vs_inductor"] == {"skipped": "inductor: inductor disabled"}
    assert rec["effcompile"]["fallbacks"] == [] and rec["effcompile"]["fired"]["quantize"] > 0
    # The peer for a quantize spec: TorchAO measured in the same run, or why not (not installed in CI).
    peer = pre["torchao"]
    assert peer.get("median_ms", 0) > 0 or "torchao" in peer.get("skipped", "") + peer.get("failed", ""), peer
    assert d1["effcompile"]["cuda_graph"] is False  # CPU: the plain loop


def test_torchao_peer_only_for_one_plain_quantize():
    from effcompile.bench import peers
    from effcompile.passes import Quantize, RemoveDropout

    assert "exactly one quantize" in peers.torchao_config([Quantize(), RemoveDropout()])[1]
    assert "exactly one quantize" in peers.torchao_config([])[1]
    assert "no equivalent" in peers.torchao_config([Quantize(targets=("attn",))])[1]


@pytest.fixture(scope="module")
def tiny_embedder(minilm):
    """A tiny random BERT with MiniLM's vocabulary and tokenizer: the embedding path in seconds."""
    from effcompile.testing import tiny_hf

    _, tok = minilm
    model = tiny_hf("bert", vocab=tok.vocab_size)

    def make_inputs(batch=2, seq=None, seed=0):
        return dict(tok(["one short sentence"] * batch, padding="max_length", max_length=seq or 16,
                        return_tensors="pt"))
    return ZooModel("tiny-embedder", model, make_inputs, "embedding", tok)


def test_embedding_record_dense_is_full_recovery(tiny_embedder):
    rec = harness.run(tiny_embedder, "none", harness.BenchSettings(**FAST))
    q = rec["quality"]
    assert q["metric"] == "recall@1" and q["recovery"] == 1.0 and q["base"] == q["optimized"]
    assert q["details"]["cosine"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert q["details"]["retrieval_agreement"] == {"top1": 1.0, "top5": 1.0}
    assert rec["speed"]["decode"] == {"skipped": "task 'embedding' has no decode"}


def test_failed_variants_are_recorded_as_failed(monkeypatch, tiny_embedder):
    def boom(*a, **k):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(harness, "build_effcompile", boom)
    monkeypatch.setattr(harness, "build_inductor", boom)
    rec = harness.run(tiny_embedder, "none", harness.BenchSettings(**{**FAST, "inductor": True}))
    json.dumps(rec, allow_nan=False)
    _numbers_only_where_measured(rec)
    assert rec["quality"] == {"failed": "RuntimeError: no kernel for you"}
    assert rec["speed"]["prefill"]["effcompile"] == {"failed": "RuntimeError: no kernel for you"}
    assert rec["speed"]["prefill"]["inductor"] == {"failed": "RuntimeError: no kernel for you"}
    assert rec["speed"]["prefill"]["eager"]["median_ms"] > 0
    assert rec["ratios"]["prefill_speedup_vs_eager"] == {"failed": "effcompile failed"}
    assert rec["ratios"]["inductor_prefill_speedup_vs_eager"] == {"failed": "inductor failed"}
    table = report.markdown_table([rec])
    assert "| tiny-embedder | `none` | failed | failed | failed | failed |" in table


def test_eager_fallback_is_a_failure_not_a_number(monkeypatch):
    """effcompile compiled nothing (dynamo ran eagerly): the variant's speed must not be reported."""
    s = harness.BenchSettings(**{**FAST, "decode": False})
    monkeypatch.setattr(harness, "build_effcompile", lambda model, configs, calib, s: _EagerLooking(model))
    rec = harness.run("bert-tiny", "none", s)
    assert "no effcompile graph ran" in rec["speed"]["prefill"]["effcompile"]["failed"]
    assert "failed" in rec["quality"]


class _EagerLooking(torch.nn.Module):
    """Looks like an effcompile module to explain() but never runs a compiled graph."""

    def __init__(self, model):
        super().__init__()
        from effcompile.compiler.api import _Compiler
        from effcompile.compiler.backend import Settings

        self.model = model
        self._ec = _Compiler(model, Settings.make(passes=None), dynamic=None, fullgraph=False)

    def forward(self, **kw):
        return self.model(**kw)


# ----------------------------------------------------------------------------- report helpers
def test_pareto_front():
    pts = [(1.0, 100.0), (2.0, 99.0), (1.5, 98.0), (3.0, 90.0), (2.5, 89.0), (0.9, 100.0)]
    assert report.pareto_front(pts) == [0, 1, 3]


def test_settings_validation_names_the_field():
    with pytest.raises(ValueError, match="BenchSettings.batch=0"):
        harness.BenchSettings(batch=0)
    with pytest.raises(ValueError, match="BenchSettings.dtype='fp8'"):
        harness.BenchSettings(dtype="fp8")
    with pytest.raises(ValueError, match="BenchSettings.decode_batches"):
        harness.BenchSettings(decode_batches=(1, 0))


def _counting_backend():
    """A dynamo backend running each graph as traced, counting graphs built and calls into them."""
    seen = {"graphs": 0, "calls": 0}

    def backend(gm, example_inputs):
        seen["graphs"] += 1

        def run(*args):
            seen["calls"] += 1
            return gm(*args)
        return run
    return backend, seen


@pytest.mark.parametrize("own_cache_view", [True, False])
def test_compile_regions_traces_a_block_once_and_runs_every_layer_compiled(own_cache_view):
    # Ten layers share one compiled forward. With its own KV-cache layer handed to each block, one decode step
    # is one graph that all ten run; where a block's layer_idx is not its position (own_cache_view=False) the
    # cache passes through and each layer is a graph of its own, past dynamo's default limit of 8 (which would
    # leave the last two eager without saying so). Either way the logits are eager's.
    import copy

    from effcompile.bench import peers, timing
    from effcompile.testing import tiny_hf

    model = tiny_hf("llama", layers=10)
    compiled = copy.deepcopy(model)
    if not own_cache_view:
        for layer in compiled.model.layers:
            layer.mlp.layer_idx = 99  # a module of each block claims an index not its position
    torch._dynamo.reset()
    backend, seen = _counting_backend()
    names = peers.compile_regions(compiled, backend=backend)
    assert names == [f"model.layers.{i}" for i in range(10)]
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = timing.decode_speed(compiled, model, prompt, 2, 1, "cpu")
        assert r["logits_vs_eager"]["max_abs_diff"] == 0.0
        graphs, calls = seen["graphs"], seen["calls"]
        ids = torch.tensor([[7]])
        assert torch.equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert graphs == (1 if own_cache_view else 10)
    assert calls == 10 * (1 + 1 + 2)  # the checked step, one warm-up and two timed steps, ten layers each
    assert seen["calls"] - calls == 10  # the cache-less call: every layer compiled too


def test_compile_regions_refuses_a_model_without_block_classes():
    from effcompile.bench import peers

    with pytest.raises(ValueError, match="no repeated block class"):
        peers.compile_regions(torch.nn.Sequential(torch.nn.Linear(2, 2)))
