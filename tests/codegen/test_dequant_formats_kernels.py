"""fp8 / MX weight-only and dynamic activation-quantization (W8A8, fp8) kernels vs the eager reference under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import act_quant as AQ
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import ops as qops

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
WEIGHT_ONLY = [("fp8", 0), ("mxint8", 32), ("mxfp8", 32)]
ACT_PAIRS = [("int8", "int8", 0), ("int8", "mxint8", 32), ("fp8", "fp8", 0), ("fp8", "mxfp8", 32)]
# (m, n, k, bias): odd N, K a few MX blocks (3 or 5 of 32, not a multiple of 64), M across the GEMV/GEMM switch.
SHAPES = [(1, 40, 96, True), (3, 72, 160, False), (8, 40, 160, True), (17, 72, 96, True)]
# block_k 32 turns K = 160 into 5 blocks, so small shapes still split K (2 splits: 96 + 64; 3: 64 + 64 + 32).
SPLIT_CONFIG = plan.Config(32, 32, 4, 1)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(fmt, group, n, k, m, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / 20).to(dtype)
    w[0, :group or k] = 0  # an all-zero row / MX block: quantize's exponent floor (2**-127) is decoded too
    qw = qops.quantize_weight(w, fmt, group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, qw, b


def _rel_err(got, want):
    return (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()


def _check(x, qw, b, act="none", **kw):
    got = D.launch(x, *qw[:3], b, qw.fmt, qw.group_size, act=act, **kw)
    want = D.reference(x, *qw[:3], b, qw.fmt, qw.group_size, act)
    assert got.shape == want.shape and got.dtype == x.dtype
    # Relative to the output's scale: the kernels accumulate in fp32 (or int32) in another order.
    assert _rel_err(got, want) <= TOL[x.dtype], f"relative error {_rel_err(got, want):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,bias", SHAPES)
@pytest.mark.parametrize("fmt,group", WEIGHT_ONLY)
def test_weight_only_formats(fmt, group, m, n, k, bias, dtype):
    _check(*_case(fmt, group, n, k, m, dtype, bias, seed=m))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,bias", SHAPES[::3])
@pytest.mark.parametrize("act,fmt,group", ACT_PAIRS)
def test_activation_quantized(act, fmt, group, m, n, k, bias, dtype):
    _check(*_case(fmt, group, n, k, m, dtype, bias, seed=m), act=act)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("act,fmt,group", [("none", f, g) for f, g in WEIGHT_ONLY] + [("int8", "int8", 0)])
def test_forced_split_k(act, fmt, group, splits):
    # Decode on a GPU splits K over programs adding fp32 partial sums atomically (bias by split 0 only).
    x, qw, b = _case(fmt, group, 40, 160, 3, torch.float32, seed=splits)
    _check(x, qw, b, act=act, split_k=splits, config=SPLIT_CONFIG)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("fmt,group", WEIGHT_ONLY)
def test_fma_decode_configs(fmt, group, m):
    # fma=True (products summed in registers, BLOCK_M = rows padded to a power of two), K split in 3.
    _check(*_case(fmt, group, 40, 160, m, torch.bfloat16, seed=m), split_k=3, config=SPLIT_CONFIG._replace(fma=True))


def test_w8a8_refuses_an_fma_config():
    x, qw, b = _case("int8", 0, 40, 96, 1, torch.float16)
    with pytest.raises(ValueError, match="fma=False"):
        AQ.w8a8(x, qw.qweight, qw.scales, b, config=SPLIT_CONFIG._replace(fma=True))


@pytest.mark.parametrize("m", [1, 17])
def test_w8a8_matches_the_int_mm_path(m):
    # Same int32 sums and the same fp32 rescale order as ops._w8a8 (torch._int_mm): equal up to fp32 noise.
    x, qw, b = _case("int8", 0, 72, 160, m, torch.float32, seed=m)
    got = D.launch(x.view(m, 1, 160), *qw[:3], b, "int8", 0, act="int8")
    assert got.shape == (m, 1, 72)
    torch.testing.assert_close(got.view(m, 72), qops._w8a8(x, qw.qweight, qw.scales, b), rtol=1e-6, atol=1e-6)


def _rows_with_rounding_edges(dtype):
    # Row 0: amax 127 -> int8 scale exactly 1, so x / s lands on .5 ties (round half to even).
    # Row 1: amax 448 -> fp8 scale exactly 1: ties between e4m3 neighbours (17 -> 16, 19 -> 20, 2**-9 * 1.5
    #        -> 2**-8), a mantissa carry into the exponent (125.2 -> 128), subnormals, the largest value.
    # Rows 2-4: random, one all zero (scale clamped to 1e-12).
    x = torch.zeros(5, 40)
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -3.5])
    x[1, :10] = torch.tensor([448.0, 17.0, 19.0, 125.2, 2**-9 * 1.5, -(2**-9) * 2.5, 0.01, -0.0007, 240.0, -464.0 / 2])
    x[2:4] = torch.randn(2, 40, generator=torch.Generator().manual_seed(1)) * 3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_row_quantize_matches_quantize_activation_exactly(act, dtype):
    x = _rows_with_rounding_edges(dtype)
    q, s = AQ.quantize_rows(x, act)
    want_q, want_s = qops.quantize_activation(x, act)
    assert torch.equal(s, want_s)
    assert torch.equal(q.float(), want_q.float())
    fake, _ = AQ.quantize_rows(x, act, fake=True)
    assert fake.dtype == dtype and torch.equal(fake, qops.fake_quantize_activation(x, act))


def test_row_quantize_divides_correctly_rounded():
    # Values whose code depends on x / s being correctly rounded: x * (1 / s) (or the GPU's approximate
    # division) lands on the other side of a .5 boundary for each of them.
    amax = torch.tensor(100.3)
    s = (amax / 127.0).clamp_min(1e-12)
    picked = []
    for k in range(127):
        v = ((k + 0.5) * s).reshape(1)
        for _ in range(4):
            for c in (v, -v):
                if torch.round(c / s) != torch.round(c * (1.0 / s)):
                    picked.append(c)
            v = torch.nextafter(v, torch.tensor(200.0))
    assert len(picked) >= 10, len(picked)  # the test has something to catch
    x = torch.cat([amax.reshape(1), *picked]).view(1, -1)
    q, sx = AQ.quantize_rows(x, "int8")
    assert torch.equal(sx, s.view(1, 1)) and torch.equal(q, qops.quantize_activation(x, "int8")[0])


def test_mx_exponent_floor_decodes_to_a_subnormal_scale():
    # Weights near 2**-125: mxfp8 clamps the block exponent to -127, whose scale 2**-127 is an fp32
    # subnormal (its bits are not (e + 127) << 23). Nonzero codes times that scale must survive.
    x, qw, b = _case("mxfp8", 32, 40, 96, 2, torch.float32, bias=False)
    qw = qops.quantize_weight(qops.dequantize(*qw[:3], "mxfp8", 32) * 2.0**-125, "mxfp8", 32)
    assert (qw.scales == -127).any() and qw.qweight[qw.scales.repeat_interleave(32, 1) == -127].float().abs().max() > 0
    _check(x, qw, b)


def test_kind_for_names_the_kernel_of_every_format_and_activation_pair():
    for act, fmts in qops.ACTIVATIONS.items():
        for fmt in fmts:
            for rows, shape in ((1, "gemv"), (8, "gemv"), (9, "gemm"), (None, "gemm")):
                kind = D.kind_for(rows, fmt, act)
                assert "eager" not in kind and kind.endswith(shape), (fmt, act, kind)
    assert D.kind_for(1, "fp8") == "dequant-gemv" and D.kind_for(20, "int8", "int8") == "w8a8-gemm"
    assert D.kind_for(1, "mxfp8", "fp8") == "fp8-fake-quant+dequant-gemv"
    assert D.kind_for(1, "int4", "int8") == "eager (no Triton kernel for this format)"  # no such pairing
    x, qw, _ = _case("mxint8", 32, 8, 64, 2, torch.float32)
    assert D.supported(x, qw.qweight, "mxint8", 32, "int8") is None
    assert D.supported(x, qw.qweight, "int4", 32, "int8") is not None
    assert D.supported(x[:, :48], qw.qweight, "mxint8", 32) is not None  # K not a whole number of blocks


@pytest.mark.parametrize("act,fmt,group", [("none", "mxfp8", 32), ("int8", "int8", 0)])
def test_op_runs_triton_when_interpreting(monkeypatch, act, fmt, group):
    x, qw, b = _case(fmt, group, 24, 64, 2, torch.float32)
    op = cg_ops.op_for(D.NAME)
    before = cg_ops.PATH_COUNTS[D.NAME]["triton"]
    tri = op(x, *qw[:3], b, fmt, group, act, cg_ops.MODE_AUTO)
    assert cg_ops.PATH_COUNTS[D.NAME]["triton"] == before + 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    eager = op(x, *qw[:3], b, fmt, group, act, cg_ops.MODE_AUTO)  # CPU without the interpreter: eager path
    torch.testing.assert_close(tri, eager, rtol=1e-4, atol=1e-4)
