"""Every generated kernel kind, run by the Triton interpreter on CPU, against its eager reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cg_util import capture

from effcompile.codegen import ops
from effcompile.codegen.lower import lower

pytestmark = pytest.mark.interpreter

K = 16  # linear input width (kept tiny: the matmul runs eagerly, only the epilogue is a kernel)


def bias_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def bias_gelu_tanh(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def bias_residual_layernorm(x, w, b, r, g, beta):
    h = F.linear(x, w, b) + r
    return h, F.layer_norm(h, (h.shape[-1],), g, beta, 1e-5)


def rmsnorm_decomposed(x, r, w):
    # Llama's RMSNorm after a residual add: two outputs (the residual stream and the normed value).
    h = x + r
    hf = h.to(torch.float32)
    var = hf.pow(2).mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(var + 1e-6)
    return h, w * hf.to(x.dtype)


def rms_norm_native(x, w):
    return torch.rms_norm(x, (x.shape[-1],), w, 1e-6)


def softmax(x):
    return torch.softmax(x * 0.125, dim=-1)


def stable_max(x):
    return torch.exp(x - x.amax(-1, keepdim=True))


def swiglu(a, b):
    return F.silu(a) * b


def relu(x):
    return torch.relu(x)


def chain(x, y):
    return (torch.sigmoid(x) * 2.0 - torch.tanh(y) / 3.0 + torch.exp(-x.abs())) * torch.rsqrt(y * y + 1.0)


def _inputs(case, lead, n, dtype, gen):
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    full = lambda: r(*lead, n)
    if case in (bias_gelu, bias_gelu_tanh):
        return (r(*lead, K), r(n, K) / 4, r(n))
    if case is bias_residual_layernorm:
        return (r(*lead, K), r(n, K) / 4, r(n), full(), r(n), r(n))
    if case is rmsnorm_decomposed:
        return (full(), full(), r(n))
    if case is rms_norm_native:
        return (full(), r(n))
    if case in (swiglu, chain):
        return (full(), full())
    return (full(),)


CASES = {
    f.__name__: f
    for f in (
        bias_gelu,
        bias_gelu_tanh,
        bias_residual_layernorm,
        rmsnorm_decomposed,
        rms_norm_native,
        softmax,
        stable_max,
        swiglu,
        relu,
        chain,
    )
}
EXPECT_KIND = {
    "bias_gelu": "epilogue",
    "bias_gelu_tanh": "epilogue",
    "bias_residual_layernorm": "epilogue",
    "relu": "pointwise",
    "swiglu": "pointwise",
    "chain": "pointwise",
}
SHAPES = [((3,), 781), ((5,), 1823), ((2, 3), 781)]
# fp32: the kernel's erf/exp/reduction order differ from ATen's by a few ulp.
# fp16: every intermediate is rounded like eager, but an fp32 difference of 1 ulp can flip a rounding.
# bf16: the interpreter converts fp32->bf16 by truncation (GPUs round to nearest), so up to a few
#       bf16 ulp (2**-8 relative each) accumulate along a chain.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}

_LOWERED: dict = {}


def _lowered(name, dtype, tmp_path_factory):
    """Capture + lower once per (case, dtype); the graph holds no sizes, so it runs at every shape."""
    key = (name, dtype)
    if key not in _LOWERED:
        fn = CASES[name]
        gm = capture(fn, *_inputs(fn, (3,), 781, dtype, torch.Generator().manual_seed(0)))
        # Lowered for Triton (interpreter on at lowering), so biases split into epilogues; each call
        # below still picks Triton or the torch path from TRITON_INTERPRET at call time.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            res = lower(gm, tmp_path_factory.mktemp("kernels"), use_triton=None)
        _LOWERED[key] = (gm, res)
    return _LOWERED[key]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, dtype, tmp_path_factory, monkeypatch):
    gm, res = _lowered(name, dtype, tmp_path_factory)
    assert len(res.kernels) == 1, res
    rec = res.kernels[0]
    if name in EXPECT_KIND:
        assert rec.kind == EXPECT_KIND[name]
    else:
        assert rec.kind == "reduction"
    fn = CASES[name]
    for i, (lead, n) in enumerate(SHAPES):
        args = _inputs(fn, lead, n, dtype, torch.Generator().manual_seed(i))
        eager = fn(*args)
        eager = eager if isinstance(eager, tuple) else (eager,)

        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        before = dict(ops.PATH_COUNTS[rec.name])
        ref = gm(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        assert ops.PATH_COUNTS[rec.name]["torch"] == before.get("torch", 0) + 1
        for r, e in zip(ref, eager, strict=True):
            # The reference is the graph's own ops; epilogues differ from eager only in that the split
            # linear rounds its output to fp16/bf16 before the bias add (addmm rounds once).
            torch.testing.assert_close(r, e, **TOL[dtype])

        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at call time: the Triton kernel runs
        tri = gm(*args)
        tri = tri if isinstance(tri, tuple) else (tri,)
        assert ops.PATH_COUNTS[rec.name]["triton"] == before.get("triton", 0) + 1
        for t, r in zip(tri, ref, strict=True):
            assert t.dtype == r.dtype and t.shape == r.shape
            torch.testing.assert_close(t, r, **TOL[dtype])


def test_masked_lanes_use_reduction_identity(tmp_path):
    """All-negative rows: a max over zero-filled masked lanes would return 0 instead of the true max."""
    gm = capture(stable_max, torch.randn(3, 781))
    lower(gm, tmp_path, use_triton=True)
    x = -torch.rand(4, 781) - 5.0
    torch.testing.assert_close(gm(x)[0], stable_max(x), rtol=1e-5, atol=1e-6)


def test_cpu_torch_path_keeps_the_bias_in_the_linear(tmp_path, monkeypatch):
    # Without Triton (CPU, no interpreter) a split bias would be a matmul + a separate add instead of
    # one addmm, so lowering leaves the linear whole and the group is the activation alone.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn = CASES["bias_gelu"]
    gm = capture(fn, *_inputs(fn, (3,), 781, torch.float32, torch.Generator().manual_seed(0)))
    res = lower(gm, tmp_path, use_triton=None)
    assert [k.kind for k in res.kernels] != ["epilogue"]
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert linears and all(len(n.args) == 3 and n.args[2] is not None for n in linears), gm.code
    args = _inputs(fn, (5,), 1823, torch.float32, torch.Generator().manual_seed(1))
    out = gm(*args)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, fn(*args), **TOL[torch.float32])
