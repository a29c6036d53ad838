"""EoRA side path (passes/eora.py) fused into the dequant kernel: kernel vs reference under TRITON_INTERPRET=1,
and lowering (what is fused, what must stay two torch linears + an add)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import effcompile as ec
import effcompile.codegen.lower as lower_mod
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import ops as qops
from effcompile.compiler.ir import annotate

pytestmark = pytest.mark.interpreter

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# (m, n, k, rank, bias): M across the GEMV/GEMM switch (8 / 17), odd N, K not a multiple of 64, ranks below,
# at and above tl.dot's 16-wide minimum (the rank tile is padded to a power of two and masked).
SHAPES = [(1, 40, 96, 1, True), (3, 72, 160, 5, False), (8, 40, 160, 16, True), (17, 72, 96, 33, False)]
FORMATS = [("int8", 0), ("int4", 32), ("fp8", 0), ("mxint8", 32)]
SPLIT_CONFIG = plan.Config(32, 32, 4, 1)  # block_k 32: K = 160 is 5 blocks, so 2 or 3 K splits really happen
_LINEAR = torch._C._nn.linear


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(fmt, group, n, k, m, r, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = qops.quantize_weight((torch.randn(n, k, generator=gen) / 20).to(dtype), fmt, group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    # Factors sized so the low-rank term is a large part of the output: a kernel that drops it or adds it
    # twice (every K split) misses the tolerance by orders of magnitude.
    a = (torch.randn(r, k, generator=gen) / 2).to(dtype)
    lb = (torch.randn(n, r, generator=gen) / 2).to(dtype)
    return x, qw, b, a, lb


def _rel_err(got, want):
    return (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()


def _check(x, qw, b, a, lb, act="none", **kw):
    got = D.launch(x, *qw[:3], b, qw.fmt, qw.group_size, act=act, lora_a=a, lora_b=lb, **kw)
    want = D.reference(x, *qw[:3], b, qw.fmt, qw.group_size, act, lora_a=a, lora_b=lb)
    assert got.shape == want.shape and got.dtype == x.dtype
    # The check can fail: without the term (or with it twice) the error would be far above the tolerance.
    assert _rel_err(D.reference(x, *qw[:3], b, qw.fmt, qw.group_size, act), want) > 20 * TOL[x.dtype]
    assert _rel_err(got, want) <= TOL[x.dtype], f"relative error {_rel_err(got, want):.2e}"


# -- the kernel ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("m,n,k,r,bias", SHAPES)
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_kernel_adds_the_low_rank_term(fmt, group, m, n, k, r, bias, dtype):
    _check(*_case(fmt, group, n, k, m, r, dtype, bias, seed=m + r))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("mxint8", 32)])
def test_fma_decode_config_adds_the_term_once(fmt, group, m):
    # fma=True replaces the low-rank dot too (a 16-row tl.dot cannot take BLOCK_M 1 or 4), split 3 ways.
    x, qw, b, a, lb = _case(fmt, group, 40, 160, m, 5, torch.float16, seed=m)
    _check(x, qw, b, a, lb, split_k=3, config=SPLIT_CONFIG._replace(fma=True))


def test_rank_above_one_tile():
    # BLOCK_R caps at 64: rank 80 takes two rank tiles (the second one masked past 80).
    _check(*_case("int8", 0, 40, 96, 3, 80, torch.float32))


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_split_k_adds_the_term_once(fmt, group, splits):
    assert plan.k_split(1, 160, SPLIT_CONFIG.block_k, torch.device("cpu"), splits) < 160  # really split
    x, qw, b, a, lb = _case(fmt, group, 40, 160, 3, 5, torch.float32, seed=splits)
    _check(x, qw, b, a, lb, split_k=splits, config=SPLIT_CONFIG)


@pytest.mark.parametrize("act,fmt,group", [("int8", "mxint8", 32), ("fp8", "fp8", 0)])
def test_fake_quant_activation_paths_use_the_unquantized_x(act, fmt, group):
    # The side path reads x itself, not its per-token fake-quantized copy: reference() does the same.
    x, qw, b, a, lb = _case(fmt, group, 72, 160, 3, 16, torch.float32, seed=1)
    _check(x, qw, b, a, lb, act=act)
    _check(x, qw, b, a, lb, act=act, split_k=2, config=SPLIT_CONFIG)


def test_leading_dims_and_w8a8_refusal():
    x, qw, b, a, lb = _case("int8", 0, 40, 96, 6, 5, torch.float32)
    x3 = x.view(2, 3, 96)
    got = D.launch(x3, *qw[:3], b, "int8", 0, lora_a=a, lora_b=lb)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, D.reference(x3, *qw[:3], b, "int8", 0, lora_a=a, lora_b=lb), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="W8A8"):
        D.launch(x, *qw[:3], b, "int8", 0, act="int8", lora_a=a, lora_b=lb)
    assert D.supported(x, qw.qweight, "int8", 0, "int8", lora=True) is not None
    assert D.supported(x, qw.qweight, "int8", 0, "int8") is None


def test_op_paths_match_the_unfused_graph(monkeypatch):
    x, qw, b, a, lb = _case("int4", 32, 72, 96, 3, 5, torch.float16)
    op = cg_ops.op_for(D.NAME)
    unfused = qops.wq_linear_eager(x, *qw[:3], b, "int4", 32) + _LINEAR(_LINEAR(x, a), lb)
    eager = op(x, *qw[:3], b, "int4", 32, "none", cg_ops.MODE_TORCH, a, lb)
    torch.testing.assert_close(eager, unfused, rtol=0, atol=0)  # the torch path is the side path itself
    before = dict(cg_ops.PATH_COUNTS[D.NAME])
    tri = op(x, *qw[:3], b, "int4", 32, "none", cg_ops.MODE_AUTO, a, lb)
    assert cg_ops.PATH_COUNTS[D.NAME]["triton"] == before.get("triton", 0) + 1
    assert _rel_err(tri, unfused) <= TOL[torch.float16]
    # W8A8 has no low-rank term in its kernel: the op runs its eager path (still the right result).
    xq, qq, bq, aq, lbq = _case("int8", 0, 40, 96, 2, 4, torch.float32)
    w8a8 = op(xq, *qq[:3], bq, "int8", 0, "int8", cg_ops.MODE_AUTO, aq, lbq)
    want = qops.wq_linear_eager(xq, *qq[:3], bq, "int8", 0, "int8") + _LINEAR(_LINEAR(xq, aq), lbq)
    torch.testing.assert_close(w8a8, want, rtol=0, atol=0)


# -- lowering: a hand-built graph ----------------------------------------------------------------------------


def _side_path_graph(fmt="int8", group=0, act="none", other_x=False, extra_user=False) -> tuple:
    """gm(x, y) = wq_linear(x) + linear(linear(x or y, A), B), as passes/eora.py leaves it."""
    x, qw, b, a, lb = _case(fmt, group, 40, 96, 3, 5, torch.float32)
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    g = gm.graph
    px, py = g.placeholder("x"), g.placeholder("y")
    attrs = {}
    for name, t in (("q", qw.qweight), ("s", qw.scales), ("z", qw.zeros), ("bias", b), ("_ec_eora_0_a", a),
                    ("_ec_eora_0_b", lb)):
        if t is not None:
            gm.register_buffer(name, t)
            attrs[name] = g.get_attr(name)
    q = g.call_function(qops.wq_linear_op(), (px, attrs["q"], attrs["s"], attrs.get("z"), attrs["bias"], fmt,
                                              group, act))
    ax = g.call_function(_LINEAR, (py if other_x else px, attrs["_ec_eora_0_a"]))
    bax = g.call_function(_LINEAR, (ax, attrs["_ec_eora_0_b"]))
    total = g.call_function(operator.add, (q, bax))
    g.output((total, q) if extra_user else total)
    gm.recompile()
    inputs = (x, x + 0.5 if other_x else x)
    annotate(gm, inputs)
    return gm, inputs


def _eora_linears(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in lower_mod._LINEARS
            and any(a.op == "get_attr" and "_ec_eora_" in a.target for a in n.all_input_nodes)]


@pytest.mark.parametrize("fmt,group,act,label", [("int8", 0, "none", "int8+eora-r5"),
                                                   ("int4", 32, "none", "int4g32+eora-r5"),
                                                   ("mxint8", 32, "int8", "mxint8g32-aint8+eora-r5")])
@torch.no_grad()
def test_lowering_fuses_the_side_path(tmp_path, fmt, group, act, label):
    gm, inputs = _side_path_graph(fmt, group, act)
    want = gm(*inputs)
    res = lower_mod.lower(gm, tmp_path, use_triton=True)
    assert not _eora_linears(gm)
    assert not [n for n in gm.graph.nodes if n.target is operator.add]
    (rec,) = [k for k in res.kernels if k.name == D.NAME]
    assert rec.ops == ("wq_linear", label) and rec.kind == D.kind_for(3, fmt, act) and not res.fallbacks
    assert _rel_err(gm(*inputs), want) <= 1e-5


@pytest.mark.parametrize("case", ["other_x", "extra_user", "w8a8", "torch_path"])
@torch.no_grad()
def test_lowering_leaves_the_side_path_when_it_cannot_fuse(tmp_path, case):
    gm, inputs = _side_path_graph(other_x=case == "other_x", extra_user=case == "extra_user",
                                  act="int8" if case == "w8a8" else "none")
    want = gm(*inputs)
    res = lower_mod.lower(gm, tmp_path, use_triton=case != "torch_path")
    assert len(_eora_linears(gm)) == 2
    assert not any("eora" in k.ops[-1] for k in res.kernels)
    assert any("W8A8" in why for _, why in res.fallbacks) == (case == "w8a8")
    got = gm(*inputs)
    for g, w in zip(got, want, strict=True) if case == "extra_user" else [(got, want)]:
        assert _rel_err(g, w) <= 1e-5


# -- lowering: Quantize(eora_rank=4) on a tiny llama, end to end ---------------------------------------------


def _compile_tiny_llama(monkeypatch, use_triton):
    from effcompile.testing import tiny_hf

    graphs = []
    real = lower_mod.lower

    def spy(gm, *a, **kw):  # keep the lowered graph to look at its nodes
        res = real(gm, *a, **kw)
        graphs.append(gm)
        return res

    monkeypatch.setattr(lower_mod, "lower", spy)
    model = tiny_hf("llama", layers=2, hidden=64)
    gen = torch.Generator().manual_seed(3)
    # Calibration batches shaped like the call's input (the calibration run reuses the captured shapes).
    calib = [(torch.randint(0, 128, (1, 5), generator=gen),) for _ in range(2)]
    ids = torch.randint(0, 128, (1, 5), generator=gen)
    torch._dynamo.reset()
    fast = ec.effcompile(model, passes=[ec.Quantize(weights="int8", eora_rank=4)], calibration=calib,
                         cache=False, use_triton=use_triton)
    with torch.no_grad():
        out = fast(ids).logits
    (gm,) = graphs
    return out, gm, ec.explain(fast)


def test_tiny_llama_fuses_every_side_path_and_matches_torch(monkeypatch):
    fused, gm, report = _compile_tiny_llama(monkeypatch, use_triton=True)
    assert not _eora_linears(gm)
    dq = [k for k in report.kernels if k.name == D.NAME]
    assert len(dq) == 14 and all(k.ops[-1] == "int8+eora-r4" and k.kind == "dequant-gemv" for k in dq)
    unfused, gm2, report2 = _compile_tiny_llama(monkeypatch, use_triton=False)
    assert len(_eora_linears(gm2)) == 28  # use_triton=False: every side path stays (2 linears each)
    assert not any("eora" in k.ops[-1] for k in report2.kernels)
    assert _rel_err(fused, unfused) <= 1e-4


def test_cpu_bag_path_keeps_the_side_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU without Triton: weight-only int8 goes to the bag GEMV
    out, gm, report = _compile_tiny_llama(monkeypatch, use_triton=None)
    assert len(_eora_linears(gm)) == 28
    assert {k.name for k in report.kernels if k.ops[0] == "wq_linear"} == {"bag_linear"}
    assert not any("eora" in k.ops[-1] for k in report.kernels)
    assert torch.isfinite(out).all()
