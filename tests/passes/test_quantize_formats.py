"""Quantize's fp8, MX block (mxint8 / mxfp8) and dynamic-activation (W8A8, FP8 x FP8) formats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effcompile as ec
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.compiler import ops as qops

# Measured on the real MiniLM-L6 (benchmarks/quantize.py, 2026-11-26), embedding cosine min over 8
# sentences: fp8 0.9982, mxint8 0.9996, mxfp8 0.9980, int8-aint8 0.9966, mxint8-aint8 0.9965,
# fp8-afp8 0.9968, mxfp8-afp8 0.9969. Budgets keep a margin below those.
COSINE = {("fp8", "none"): 0.996, ("mxint8", "none"): 0.999, ("mxfp8", "none"): 0.996,
          ("int8", "int8"): 0.993, ("mxint8", "int8"): 0.993, ("fp8", "fp8"): 0.993, ("mxfp8", "fp8"): 0.993}


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "fp8", "group_size": 32}, "Quantize.group_size"),
    ({"weights": "mxint8", "group_size": 64}, "Quantize.group_size"),
    ({"weights": "int4", "group_size": 32, "activations": "int8"}, "Quantize.activations"),
    ({"weights": "int8", "activations": "fp8"}, "Quantize.activations"),
    ({"weights": "int8", "activations": "int4"}, "Quantize.activations"),
])
def test_bad_combinations_name_the_field_and_what_is_supported(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        ec.Quantize(**kwargs)
    assert "supported" in str(e.value)


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 128), ("fp8", 0), ("mxint8", 32),
                                       ("mxfp8", 32)])
def test_weight_sqnr_in_row_blocks_equals_the_exact_one(fmt, group, monkeypatch):
    # The pass reports each weight's SQNR from blocks of rows (ops.weight_sqnr: no weight-sized fp32 temporaries
    # on the CPU, 0.5 -> 0.13 s per llama-1b layer); blocks of 3 rows here, against fp64 over the whole weight.
    import math

    monkeypatch.setattr(qops, "_INT4_BLOCK_ELEMENTS", 3 * 256)
    w = (torch.randn(37, 256, generator=torch.Generator().manual_seed(2)) / 10).to(torch.bfloat16)
    qw = qops.quantize_weight(w, fmt, group)
    wd, dq = w.double(), qops.dequantize(*qw[:3], fmt, group, torch.float64)
    exact = 10 * math.log10(float(wd.square().sum()) / float((wd - dq).square().sum()))
    assert qops.weight_sqnr(w, qw) == pytest.approx(exact, abs=1e-3)
    assert qops.weight_sqnr(w, qops.QuantizedWeight(w, torch.ones(37), None, "int8", 0)) == math.inf  # exact


@pytest.mark.parametrize("fmt,group", [(f, g) for f, groups in qops.FORMATS.items() for g in groups])
def test_quantize_weight_keeps_every_tensor_on_the_weight_device(fmt, group):
    # CI has no GPU: fake tensors on another device than the CPU catch a CPU constant meeting the weight's tensors
    # (session 21's H100 run: int4's candidate-range table indexed by the GPU's argmin stopped every int4 config).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        q = qops.quantize_weight(torch.empty(48, 256, device="meta"), fmt, group)
    assert {t.device.type for t in (q.qweight, q.scales, q.zeros) if t is not None} == {"meta"}


@pytest.mark.parametrize("fmt,floor", [("fp8", 28.0), ("mxint8", 38.0), ("mxfp8", 28.0)])
def test_round_trip_bounds_and_storage(fmt, floor):
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(1)) / 10
    w[3, 7] = 4.0  # an outlier: only its own row (fp8) or block (mx) loses resolution
    group = qops.FORMATS[fmt][0]
    qw = qops.quantize_weight(w, fmt, group)
    deq = qops.dequantize(*qw[:3], fmt, group)
    assert qops.sqnr(w, deq) >= floor
    assert deq.abs().max() <= 4.0 * (1 + 2**-3)  # nothing saturates past the largest value
    if fmt == "fp8":
        assert qw.qweight.dtype == qops.FP8 and qw.scales.shape == (96,)
        # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value (plus the subnormal range)
        assert ((deq - w).abs() <= w.abs() / 16 + qw.scales[:, None] * 2**-9).all()
    else:
        assert qw.scales.dtype == torch.int8 and qw.scales.shape == (96, 384 // 32)
        scale = torch.exp2(qw.scales.float()).repeat_interleave(32, 1)
        if fmt == "mxint8":  # integer grid of the block's power-of-two step: half a step
            assert ((deq - w).abs() <= scale / 2 + 1e-7).all()
        # The exponent is the smallest that fits the block's max: a power of two, never saturating.
        amax = w.view(96, -1, 32).abs().amax(-1)
        qmax = 127.0 if fmt == "mxint8" else qops.FP8_MAX
        e = qw.scales.float()
        assert (amax <= qmax * torch.exp2(e) * (1 + 1e-6)).all() and (amax > qmax * torch.exp2(e - 1)).all()
    # One byte a weight (+ 1/32 byte of shared exponent, or a scale per row): ~2x smaller than bf16.
    assert w.numel() * 2 / qw.nbytes() >= 1.9


def test_w8a8_uses_integer_matmul_and_matches_reference():
    x = torch.randn(5, 256)
    qw = qops.quantize_weight(torch.randn(48, 256) / 10, "int8", 0)
    b = torch.randn(48)
    before = qops.PATH_COUNTS["wq_linear"]["w8a8-int-mm"]
    got = torch.ops.effcompile.wq_linear(x, *qw[:3], b, "int8", 0, "int8")
    assert qops.PATH_COUNTS["wq_linear"]["w8a8-int-mm"] == before + 1
    torch.testing.assert_close(got, qops.reference(x, *qw[:3], b, "int8", 0, "int8"), rtol=1e-4, atol=1e-4)
    # and the activations really were quantized: not the weight-only result
    assert not torch.allclose(got, qops.reference(x, *qw[:3], b, "int8", 0), rtol=1e-6, atol=1e-6)


def test_activation_quantization_is_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 1.0, -3.0]])
    q, s = qops.quantize_activation(x, "int8")
    assert q.dtype == torch.int8 and torch.equal(q.abs().amax(1), torch.tensor([127, 127], dtype=torch.int8))
    torch.testing.assert_close(s.squeeze(1), torch.tensor([1 / 127, 100 / 127]))
    assert torch.equal(qops.fake_quantize_activation(x, "none"), x)


_DEFAULT_LANE = {("fp8", "none"), ("mxint8", "none"), ("int8", "int8")}  # the rest run with -m slow


@pytest.mark.parametrize("fmt,act", [k if k in _DEFAULT_LANE else pytest.param(*k, marks=pytest.mark.slow)
                                     for k in COSINE])
def test_minilm_quality_and_rewrite(minilm, minilm_batch, fmt, act):
    model, _ = minilm
    cfg = ec.Quantize(weights=fmt, activations=act)
    torch._dynamo.reset()
    fast = ec.effcompile(model, passes=[cfg], cache=False)
    with torch.no_grad():
        ref = _mean_pool(model(**minilm_batch).last_hidden_state, minilm_batch["attention_mask"])
        out = _mean_pool(fast(**minilm_batch).last_hidden_state, minilm_batch["attention_mask"])
    (rec,) = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "quantize"]
    assert rec.count == 36 and rec.artifacts["format"] == fmt and rec.artifacts["activations"] == act
    assert F.cosine_similarity(ref, out).min() >= COSINE[(fmt, act)]
    # Each format/activation pairing names its own Triton kernel in explain() (MiniLM's rows are symbolic).
    kinds = {k.kind for k in ec.explain(fast).kernels if k.name == D.NAME}
    assert kinds == {D.kind_for(None, fmt, act)} and "eager" not in D.kind_for(None, fmt, act)


# -- SmoothQuant-style smoothing (calibrated) --------------------------------------------------------------


def test_smoothing_config_and_calibration_errors(minilm, minilm_batch):
    with pytest.raises(ValueError, match="Quantize.smooth"):
        ec.Quantize(smooth=1.5)
    assert ec.Quantize(smooth=0.5).needs_calibration and not ec.Quantize().needs_calibration
    model, _ = minilm
    with pytest.raises(ValueError, match="calibration"):
        ec.effcompile(model, passes=[ec.Quantize(activations="int8", smooth=0.5)], cache=False)(**minilm_batch)


def test_smoothing_fires_per_shared_input_and_helps_w8a8(minilm, minilm_batch):
    # Measured (benchmarks/smoothing.py, 32 held-out docstrings): W8A8 cosine min 0.9966 -> 0.9985 at
    # alpha 0.5. Here: calibrate on one batch, check the structure and that smoothing is not worse.
    model, tok = minilm
    from effcompile.bench import corpus

    calib = [dict(tok(corpus.stdlib_corpus(16, seed=1), padding=True, return_tensors="pt"))]
    with torch.no_grad():
        ref = _mean_pool(model(**minilm_batch).last_hidden_state, minilm_batch["attention_mask"])
    cos = {}
    for alpha in (None, 0.5):
        torch._dynamo.reset()
        fast = ec.effcompile(model, passes=[ec.Quantize(activations="int8", smooth=alpha)],
                             calibration=calib if alpha is not None else None, cache=False)
        with torch.no_grad():
            out = _mean_pool(fast(**minilm_batch).last_hidden_state, minilm_batch["attention_mask"])
        cos[alpha] = F.cosine_similarity(ref, out).min().item()
        (rec,) = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "quantize"]
        if alpha is not None:
            groups = rec.artifacts["smoothing"]["groups"]
            # per block: q/k/v share one input, o, up and down one each -> 4 smoothing scales
            assert len(groups) == 24 and sum(g["linears"] for g in groups.values()) == 36
            assert all(g["scale_min"] > 0 for g in groups.values())
        else:
            assert "smoothing" not in rec.artifacts
    assert cos[0.5] >= cos[None] - 1e-4 and cos[0.5] >= 0.996


# -- EoRA-style low-rank compensation (calibrated) --------------------------------------------------------


def test_eora_config_and_calibration(minilm, minilm_batch):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="Quantize.eora_rank"):
            ec.Quantize(weights="int4", group_size=32, eora_rank=bad)
    assert ec.Quantize(weights="int4", group_size=32, eora_rank=8).needs_calibration
    model, _ = minilm
    with pytest.raises(ValueError, match="calibration"):
        ec.effcompile(model, passes=[ec.Quantize(weights="int4", group_size=32, eora_rank=8)],
                      cache=False)(**minilm_batch)


def test_low_rank_fix_is_optimal_in_the_activation_metric():
    from effcompile.passes.eora import low_rank_fix

    gen = torch.Generator().manual_seed(0)
    err = torch.randn(40, 24, generator=gen)
    x = torch.randn(500, 24, generator=gen) * torch.linspace(0.05, 3.0, 24)  # anisotropic activations
    cov = (x.T @ x / 500).double()
    b, a, removed = low_rank_fix(err, cov, 24)  # full rank: the error is cancelled exactly
    torch.testing.assert_close((b @ a).float(), err, rtol=1e-4, atol=1e-4)
    assert removed == pytest.approx(1.0)
    b, a, removed = low_rank_fix(err, cov, 4)
    left = ((err - (b @ a).float()) @ x.T).norm()
    svd_plain = torch.linalg.svd(err)  # rank 4 in the plain weight metric: worse on these activations
    plain = svd_plain.U[:, :4] * svd_plain.S[:4] @ svd_plain.Vh[:4]
    assert left < ((err - plain) @ x.T).norm() and 0 < removed < 1


def test_eora_fires_and_cuts_the_error_on_a_tiny_llama():
    # MiniLM (benchmarks/eora.py): int4-g128 cosine min 0.942 -> 0.977 at rank 16. Here: structure,
    # and the side path must shrink the output error on held-out inputs of the same distribution.
    from effcompile.testing import tiny_hf

    model = tiny_hf("llama", layers=2, hidden=64)
    gen = torch.Generator().manual_seed(3)
    calib = [(torch.randint(0, 128, (4, 16), generator=gen),) for _ in range(4)]
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    with torch.no_grad():
        ref = model(ids).logits
    err = {}
    for rank in (0, 8):
        torch._dynamo.reset()
        cfg = ec.Quantize(weights="int4", group_size=32, eora_rank=rank)
        fast = ec.effcompile(model, passes=[cfg], calibration=calib if rank else None, cache=False)
        with torch.no_grad():
            err[rank] = (fast(ids).logits - ref).norm().item()
        (rec,) = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "quantize"]
        if rank:
            layers = rec.artifacts["eora"]["layers"]
            assert len(layers) == 14 and all(v["rank"] == 8 and 0 < v["error_removed"] <= 1 for v in layers.values())
    assert err[8] < 0.8 * err[0], err


def test_eora_fits_each_linear_with_the_side_paths_upstream_in_place(monkeypatch):
    # One pass in graph order (calibration.run_in_order): each input's covariance is taken with every upstream
    # side path already fitted, so refitting on the finished graph changes nothing; and only one covariance
    # is alive at a time (held all at once, an 8B model's would be ~65 GB of fp64).
    import weakref

    from effcompile.compiler import ir
    from effcompile.compiler.backend import _params
    from effcompile.compiler.pass_manager import PassContext, PassManager
    from effcompile.passes import eora
    from effcompile.passes.calibration import run_in_order
    from effcompile.testing import capture, tiny_hf

    alive, most = [0], [0]
    real_cov = eora._covariance

    def tracked(values):
        cov = real_cov(values)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(cov, lambda: alive.__setitem__(0, alive[0] - 1))
        return cov

    monkeypatch.setattr(eora, "_covariance", tracked)
    model = tiny_hf("llama", layers=3, hidden=64)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    (gm, ex), = capture(model, ids)
    ir.annotate(gm, ex)
    ctx = PassContext(ex, [ex], _params(gm, ex))
    (rec,) = PassManager([ec.Quantize(weights="int4", group_size=32, eora_rank=4)]).run(gm, ctx)
    assert len(rec.artifacts["eora"]["layers"]) == 3 * 7 and most[0] == 1
    covs = {}
    sites = [n for n in gm.graph.nodes if n.target is qops.wq_linear_op()]
    run_in_order(gm, ctx, [n.args[0] for n in sites], lambda name, values: covs.setdefault(name, real_cov(values)))
    for i, (q, label) in enumerate(zip(sites, rec.artifacts["eora"]["layers"], strict=True)):
        qw, sc, z = (getattr(gm, a.target) for a in q.args[1:4])
        err = model.get_submodule(label).weight.float() - qops.dequantize(qw, sc, z, "int4", 32)
        b, a, _ = eora.low_rank_fix(err, covs[q.args[0].name], 4)
        fitted = getattr(gm, f"_ec_eora_{i}_b") @ getattr(gm, f"_ec_eora_{i}_a")
        torch.testing.assert_close(fitted, (b @ a).float(), rtol=1e-4, atol=1e-6, msg=label)


def test_decode_graph_reuses_smoothing_and_eora_of_the_calibrated_graph():
    # Calibration batches are prefill-shaped: the decode graph (one token, a KV cache) records nothing, so
    # it used to fail with "needs calibration data". It now reuses the scales and factors fitted for the
    # same weights under the same config, and a cached decode step matches the full-sequence forward.
    from effcompile.testing import tiny_hf

    model = tiny_hf("llama", layers=2, hidden=64)
    gen = torch.Generator().manual_seed(5)
    calib = [{"input_ids": torch.randint(0, 128, (2, 12), generator=gen)} for _ in range(2)]
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    scales = {}
    for alpha in (0.5, 0.8):
        torch._dynamo.reset()
        cfg = ec.Quantize(weights="int4", group_size=32, smooth=alpha, eora_rank=4)
        fast = ec.effcompile(model, passes=[cfg], calibration=calib, cache=False)
        with torch.no_grad():
            full = fast(input_ids=ids, use_cache=False).logits[:, -1]
            past = fast(input_ids=ids[:, :-1], use_cache=True).past_key_values
            step = fast(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
        graphs = [(p, gm) for g in ec.explain(fast).graphs for p in g.passes if p.name == "quantize"
                  for gm in g.graph_modules()]
        fitted = [gm for p, gm in graphs if not p.artifacts["smoothing"].get("reused")]
        reused = [(p, gm) for p, gm in graphs if p.artifacts["smoothing"].get("reused")]
        assert fitted and reused and all(p.artifacts["eora"].get("reused") and "reused" in p.note for p, _ in reused)
        scales[alpha] = [gm._ec_smooth_0 for gm in fitted] + [gm._ec_smooth_0 for _, gm in reused]
        assert all(torch.equal(t, scales[alpha][0]) for t in scales[alpha])
    # Keyed by the config: alpha 0.8's decode graph did not borrow alpha 0.5's scales.
    assert not torch.allclose(scales[0.5][0], scales[0.8][0])


def test_calibration_of_another_static_shape_is_a_clear_error_not_a_crash():
    # dynamo specialises size-1 dims: the batch-1 graph cannot replay batch-2 calibration recordings
    # (it used to run them anyway and crash inside the packed matmul).
    from effcompile.testing import tiny_hf

    model = tiny_hf("llama", layers=2, hidden=64)
    calib = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fast = ec.effcompile(model, passes=[ec.Quantize(weights="int8", eora_rank=4)], calibration=calib, cache=False)
    with pytest.raises(ValueError, match="needs calibration data.*shaped like real inputs"):
        with torch.no_grad():
            fast(torch.randint(0, 128, (1, 5)))
