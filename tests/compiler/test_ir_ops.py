"""The effcompile::wq_linear IR op: schema/fake checks, eager paths, and graphs holding it serialize."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from effcompile.compiler import ops as qops
from effcompile.runtime.serialize import graph_from_json, graph_to_json, target_to_str


def _args(fmt="int4", group=32, dtype=torch.float32, m=3):
    gen = torch.Generator().manual_seed(0)
    qw = qops.quantize_weight((torch.randn(32, 64, generator=gen) / 8).to(dtype), fmt, group)
    x = torch.randn(2, m, 64, generator=gen).to(dtype)
    return x, qw


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32)])
def test_opcheck(fmt, group):
    x, qw = _args(fmt, group)
    # Schema, fake impl and dispatcher consistency; no autograd (an inference op).
    torch.library.opcheck(torch.ops.effcompile.wq_linear.default, (x, *qw[:3], torch.randn(32), fmt, group),
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, qw = _args(dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = torch.ops.effcompile.wq_linear(mode.from_tensor(x), *(mode.from_tensor(t) for t in qw[:3]),
                                             None, "int4", 32)
    assert out.shape == (2, 3, 32) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eager_matches_reference_each_dtype(dtype):
    x, qw = _args(dtype=dtype)
    got = torch.ops.effcompile.wq_linear(x, *qw[:3], None, "int4", 32)
    want = qops.reference(x, *qw[:3], None, "int4", 32)
    if ("int4", dtype) in qops.BF16_ACTIVATIONS:  # fp32: torch's packed kernel on x rounded to bf16, ~0.3 % apart
        assert got.dtype == dtype and ((got - want).norm() / want.norm()).item() < 1e-2
        return
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_dequant_path_when_packed_op_is_disabled(monkeypatch):
    x, qw = _args("int8", 0)
    monkeypatch.setitem(qops.FAST_PATH_DISABLED, ("int8", torch.float32), "test")
    before = qops.PATH_COUNTS["wq_linear"]["dequant"]
    torch.ops.effcompile.wq_linear(x, *qw[:3], None, "int8", 0)
    assert qops.PATH_COUNTS["wq_linear"]["dequant"] == before + 1


def test_graph_with_the_op_round_trips_through_serialize():
    x, qw = _args()
    root = torch.nn.Module()
    root.register_buffer("qw", qw.qweight)
    root.register_buffer("s", qw.scales)
    root.register_buffer("z", qw.zeros)
    g = fx.Graph()
    inp = g.placeholder("x")
    args = (inp, g.get_attr("qw"), g.get_attr("s"), g.get_attr("z"), None, "int4", 32)
    g.output(g.call_function(qops.wq_linear_op(), args))
    gm = fx.GraphModule(root, g)
    assert target_to_str(qops.wq_linear_op()) == "torch.ops.effcompile.wq_linear.default"
    obj, tensors = graph_to_json(gm)
    assert set(tensors) == {"qw", "s", "z"} and tensors["qw"].dtype == torch.uint8
    back = graph_from_json(obj, tensors)
    torch.testing.assert_close(back(x), gm(x))
