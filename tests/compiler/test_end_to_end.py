"""effcompile(model) and torch.compile(backend="effcompile") on real HF models equal eager, with kernels.

On CPU without Triton the row-op kernels are not generated (they would only wrap torch ops), so the
tests that look at kernels lower with use_triton=False: the same kernels, run through their reference path.
"""

import warnings

import pytest
import torch

import effcompile as ec
from effcompile.testing import tiny_hf


def _blocks_with_kernels(report, layers):
    by_block = report.kernels_by_block()
    return {i for i in range(layers) if any(t.startswith(f"layers.{i}.") for t in by_block)}


def _lm_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("form", ["call", "backend"])
def test_random_init_lm_equals_eager_and_every_block_has_a_kernel(kind, form):
    model = tiny_hf(kind, layers=2)
    inputs = _lm_inputs()
    fast = (ec.effcompile(model, use_triton=False) if form == "call"
            else torch.compile(model, backend="effcompile", options={"use_triton": False}))
    with torch.no_grad():
        ref, out = model(**inputs).logits, fast(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = ec.explain(fast)
    assert report.kernels, str(report)
    assert _blocks_with_kernels(report, 2) == {0, 1}, str(report)


@pytest.mark.parametrize("form", ["call", "backend"])
def test_minilm_real_weights_equals_eager_and_every_block_has_a_kernel(minilm, minilm_batch, form):
    model, _ = minilm
    fast = (ec.effcompile(model, use_triton=False) if form == "call"
            else torch.compile(model, backend="effcompile", options={"use_triton": False}))
    with torch.no_grad():
        ref = model(**minilm_batch).last_hidden_state
        out = fast(**minilm_batch).last_hidden_state
    # fp32, but not bitwise: the bias moves from addmm into the fused epilogue, which changes the
    # summation order (6 post-LN layers amplify it to ~1e-4 absolute on outputs of magnitude ~10).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)
    report = ec.explain(fast)
    assert _blocks_with_kernels(report, 6) == set(range(6)), str(report)
    # Post-LN BERT: bias+residual+LayerNorm twice per block, bias+GELU once.
    fused = [k for k in report.kernels if k.sublayers and k.sublayers[0].startswith("layers.")]
    assert sum("layer_norm" in k.ops for k in fused) == 12, str(report)
    assert sum("gelu" in k.ops for k in fused) == 6, str(report)
    assert "remove_dropout" in report.fired()


def test_decorator_forms_function_and_module_class():
    @ec.effcompile(use_triton=False)
    def f(x, w):
        return torch.nn.functional.gelu(x @ w + 1.0)

    @ec.effcompile(cache=False, use_triton=False)
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(torch.relu(self.fc(x)) + x)

    x, w = torch.randn(5, 16), torch.randn(16, 16)
    torch.testing.assert_close(f(x, w), torch.nn.functional.gelu(x @ w + 1.0))
    net = Net()
    plain = Net.__mro__[1].forward(net, x)
    torch.testing.assert_close(net(x), plain)
    assert ec.explain(f).kernels and ec.explain(net).kernels


@pytest.mark.parametrize("form", ["call", "backend"])
def test_cpu_default_leaves_row_ops_to_torch_and_says_so(minilm, minilm_batch, form):
    # CPU, use_triton=None, no TRITON_INTERPRET: no Triton would run, so no row-op kernel is generated
    # (each would be a custom-op call around the same torch ops); the bias stays in addmm too.
    model, _ = minilm
    fast = ec.effcompile(model) if form == "call" else torch.compile(model, backend="effcompile")
    with torch.no_grad():
        ref = model(**minilm_batch).last_hidden_state
        out = fast(**minilm_batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = ec.explain(fast)
    graph = report.graphs[-1]  # the backend form's explain() also lists earlier graphs of these weights
    assert graph.kernels == [], str(report)
    assert any(why.startswith("left as torch ops: CPU without Triton") for _, why in graph.fallbacks), str(report)
    assert "row-op group(s): left as torch ops" in str(report)
    assert "remove_dropout" in report.fired()


def test_opt_level_zero_runs_the_captured_graph_without_kernels():
    model = tiny_hf("gpt2", layers=1)
    fast = ec.effcompile(model, opt_level=0)
    inputs = _lm_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, model(**inputs).logits)
    assert ec.explain(fast).kernels == []


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="nn.Module, an nn.Module class or a callable"):
        ec.effcompile(42)
    with pytest.raises(TypeError, match="instances"):
        ec.effcompile(torch.nn.Linear(2, 2), passes=[ec.RemoveDropout])
    with pytest.raises(ValueError, match="opt_level"):
        ec.effcompile(torch.nn.Linear(2, 2), opt_level=7)
    with pytest.raises(TypeError, match="explain"):
        ec.explain(object())


def test_backend_is_registered_and_rejects_unknown_options():
    assert "effcompile" in torch._dynamo.list_backends()
    model = torch.nn.Linear(4, 4)
    bad = torch.compile(model, backend="effcompile", options={"passes": [], "colour": "red"})
    with pytest.raises(Exception, match=r"unknown effcompile option\(s\) \['colour'\].*valid options: passes"):
        bad(torch.randn(2, 4))


def test_graph_breaks_are_reported_not_hidden():
    def f(x):
        y = torch.relu(x) * 2
        print("side effect")  # a graph break
        return torch.softmax(y, -1)

    fast = ec.effcompile(f, cache=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fast(x), torch.softmax(torch.relu(x) * 2, -1))
    report = ec.explain(fast)
    assert len(report.graphs) == 2 and report.graph_breaks, str(report)
    assert "graph break" in str(report)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        ec.effcompile(f, cache=False, fullgraph=True)(x)


def test_dynamo_recompile_limit_fallback_is_reported():
    model = tiny_hf("gpt2", layers=1)
    inputs = _lm_inputs()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        ec.effcompile(model, cache=False)(**inputs)  # uses the one allowed entry
        second = ec.effcompile(model, cache=False)  # a different backend: dynamo would need a 2nd entry
        with pytest.warns(RuntimeWarning, match="ran eagerly"):
            out = second(**inputs)
    torch.testing.assert_close(out.logits, model(**inputs).logits)
    assert "ran eagerly" in str(ec.explain(second))


def test_a_later_call_that_runs_eagerly_is_reported_too():
    # The first call compiled; a call with new input shapes then finds the recompile limit used up by another
    # wrapper of the same model (as a sweep over configs does) and dynamo runs it eagerly: reported once, named.
    model = tiny_hf("gpt2", layers=1)
    short, long = _lm_inputs(), {k: torch.cat([v, v], -1) for k, v in _lm_inputs().items()}
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        first = ec.effcompile(model, cache=False)
        first(**short)
        ec.effcompile(model, cache=False)(**short)  # a second backend: the second and last entry
        first(**short)
        assert not ec.explain(first).fallbacks  # warm calls run the compiled graph
        with pytest.warns(RuntimeWarning, match="new input shapes ran without any compiled graph"):
            out = first(**long)
        first(**{k: v[:, :-1] for k, v in long.items()})  # the same reason again: not added twice
    torch.testing.assert_close(out.logits, model(**long).logits)
    (reason,) = ec.explain(first).fallbacks
    assert "recompile_limit = 2" in reason and "ran eagerly" in reason


def test_new_shapes_that_compile_report_no_fallback():
    model = tiny_hf("gpt2", layers=1)
    fast = ec.effcompile(model, cache=False)
    with torch.no_grad():
        for n in (1, 2, 3):
            fast(**{k: v.repeat(1, n) for k, v in _lm_inputs().items()})
    assert not ec.explain(fast).fallbacks


def test_grad_mode_call_warns_that_outputs_do_not_require_grad():
    model = torch.nn.Linear(4, 4)
    fast = ec.effcompile(model, cache=False)
    with pytest.warns(RuntimeWarning, match="compiles for inference"):
        y = fast(torch.randn(2, 4))
    assert not y.requires_grad
    assert any(what == "autograd" for what, _ in ec.explain(fast).graphs[0].fallbacks)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(torch.randn(2, 4))  # no warning under no_grad


@pytest.mark.parametrize("passes,runs", [
    ([ec.Quantize(weights="int8")], False),  # reads no data: the batches are not run
    ([ec.Quantize(weights="int8", smooth=0.5)], True),  # SmoothQuant calibrates its scales
    ([ec.ThresholdChannels(sparsity=0.5)], True),
])
def test_calibration_batches_run_only_when_a_pass_reads_them(passes, runs):
    model = tiny_hf("llama", layers=1)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(1), with_kwargs=True)
    batches = [_lm_inputs() for _ in range(3)]
    fast = ec.effcompile(model, passes=passes, calibration=batches, cache=False)
    inputs = _lm_inputs()
    with torch.no_grad():
        out = fast(**inputs).logits
    rep = ec.explain(fast)
    noted = any("no pass needs them" in n for n in rep.notes)
    assert noted != runs and ("no pass needs them" in str(rep)) == noted
    assert (len(seen) > 1) == runs, seen  # the call itself enters forward once (dynamo), calibration more
    if not runs:  # the same result as compiling without the batches
        with torch.no_grad():
            ref = ec.effcompile(model, passes=passes, cache=False)(**inputs).logits
        torch.testing.assert_close(out, ref)
