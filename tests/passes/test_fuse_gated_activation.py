"""FuseGatedActivation: silu(gate) * up after a fused gate/up projection becomes that projection's epilogue."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.compiler import ops as qops
from effcompile.passes.fuse_gated_activation import FuseGatedActivation
from effcompile.testing import tiny_hf


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64, heads=4)


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "fuse_gated_activation"]


def _kernels(fast) -> list:
    return [k for g in ec.explain(fast).graphs for k in g.kernels]


def _decode(model, passes, batch=2, calibration=None):
    from transformers import StaticCache

    ids = torch.randint(0, 128, (batch, 5), generator=torch.Generator().manual_seed(batch))
    cache = StaticCache(config=model.config, max_cache_len=10)
    fast = ec.effcompile(model, passes=passes, cache=False, calibration=calibration)
    logits = []
    with torch.no_grad():
        if calibration:  # a compiled prefill first: the decode graph reuses the thresholds it calibrates
            fast(**calibration[0])
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for step in range(2):
            out = fast(input_ids=(ids[:, -1:] + step) % 128, past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([5 + step]))
            logits.append(out.logits)
    return fast, torch.cat(logits)


@pytest.mark.parametrize("weights,batch", [("int4", 1), pytest.param("int4", 3, marks=pytest.mark.slow), ("int8", 1)])
def test_quantized_mlp_gate_runs_in_the_gemv_epilogue(llama, weights, batch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lower as for a GPU: the linears become Triton kernels
    quant = ec.Quantize(weights=weights, group_size=32 if weights == "int4" else None)
    fast, got = _decode(llama, [quant], batch)
    plain, want = _decode(llama, [quant, FuseGatedActivation(enabled=False)], batch)
    (rec,) = [r for r in _record(fast) if r.modified]
    assert rec.count == 2 and rec.where == ["layers.0.ffn", "layers.1.ffn"]
    gated = [k for k in _kernels(fast) if any("silu_mul" in op for op in k.ops)]
    assert len(gated) == 2 and all(k.name == "dequant_linear" for k in gated)
    assert not any("silu" in k.ops for k in _kernels(fast)) and any("silu" in k.ops for k in _kernels(plain))
    assert len(_kernels(fast)) == len(_kernels(plain)) - 2  # one row kernel fewer per layer
    # Same GEMV, the row kernel's arithmetic in its epilogue (both under the interpreter's bf16 conversion).
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=2e-2)


@pytest.mark.parametrize("weights", [pytest.param(None, marks=pytest.mark.slow),  # ~14 s each (calibration)
                                     pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_thresholded_mlp_gate_runs_in_the_sparse_gemv_epilogue(llama, weights, monkeypatch):
    # float, int8 and int4 input-major layouts: each interleaves its outputs its own way (int4 within bytes)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calib = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s))} for s in range(2)]
    passes = [ec.ThresholdChannels(sparsity=0.5)]
    if weights:
        passes.append(ec.Quantize(weights=weights, group_size=32 if weights == "int4" else None))
    fast, got = _decode(llama, passes, 1, calib)
    plain, want = _decode(llama, [*passes, FuseGatedActivation(enabled=False)], 1, calib)
    recs = [r for r in _record(fast) if r.modified]  # the prefill graph's and the decode graph's
    assert len(recs) == 2 and all(r.count == 2 for r in recs)
    gated = [k for k in _kernels(fast) if any("silu_mul" in op for op in k.ops)]
    assert len(gated) == 4 and {k.name for k in gated} == {"sparse_gemv"}
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=2e-2)


def test_without_triton_the_pass_does_not_fire(llama, monkeypatch):
    # CPU tensors, no TRITON_INTERPRET: the linears run as the bag GEMV, which has no epilogue; the pass says so.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fast, _ = _decode(llama, [ec.Quantize(weights="int4", group_size=32)], 1)
    (rec,) = _record(fast)
    assert not rec.modified and "no Triton kernel runs these linears" in rec.note
    assert not any("silu_mul" in op for k in _kernels(fast) for op in k.ops)


def test_a_linear_with_an_epilogue_keeps_its_ir_op_off_the_bag_gemv(tmp_path, monkeypatch):
    # Should one reach CPU lowering anyway, it is not given to the bag GEMV (no epilogue there): its IR op
    # runs the eager path and the epilogue, and the fallback says why.
    import torch.fx as fx

    from effcompile.codegen.lower import lower

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qw = qops.quantize_weight(torch.randn(8, 32) / 10, "int8", 0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("q", qw.qweight)
            self.register_buffer("s", qw.scales)

        def forward(self, x):
            return torch.ops.effcompile.wq_linear.default(x, self.q, self.s, None, None, "int8", 0, "none", "silu_mul")

    gm, x = fx.symbolic_trace(M()), torch.randn(1, 32)
    from effcompile.compiler import ir

    ir.propagate_meta(gm, (x,))
    result = lower(gm, tmp_path)
    assert any("output epilogue" in why for _, why in result.fallbacks)
    want = qops.apply_epilogue(qops.wq_linear_eager(x, qw.qweight, qw.scales, None, None, "int8", 0), "silu_mul")
    assert torch.equal(gm(x), want) and want.shape == (1, 4)


def test_float_mlps_and_other_readers_of_the_gate_are_left_alone(llama):
    fast, _ = _decode(llama, None, 1)  # float linears: not fused, no site
    (rec,) = _record(fast)
    assert not rec.modified and rec.count == 0


def test_the_pass_refuses_a_gate_half_read_twice(monkeypatch):
    import torch.fx as fx

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as if Triton ran the linear: the site itself is refused

    from effcompile.compiler.pass_manager import PassContext
    from effcompile.passes.fuse_gated_activation import fuse_gated_activation

    qw = qops.quantize_weight(torch.randn(8, 32) / 10, "int8", 0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in zip(("q", "s"), qw[:2], strict=True):
                self.register_buffer(name, t)

        def forward(self, x):
            y = torch.ops.effcompile.wq_linear.default(x, self.q, self.s, None, None, "int8", 0)
            g = torch.ops.aten.slice.Tensor(y, -1, 0, 4)
            u = torch.ops.aten.slice.Tensor(y, -1, 4, 8)
            return torch.nn.functional.silu(g) * u + g  # g is read twice

    gm = fx.symbolic_trace(M())
    from effcompile.compiler import ir

    x = torch.randn(1, 32)
    ir.propagate_meta(gm, (x,))
    res = fuse_gated_activation(gm, FuseGatedActivation(), PassContext((x,)))
    assert not res.modified and "gate half is not read by silu alone" in res.note
