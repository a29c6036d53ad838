"""Graph JSON round trips (dynamo graphs with symbolic sizes, fx constants) and refusals."""

import json
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import run_python

from effcompile.runtime.serialize import NotSerializable, graph_from_json, graph_to_json, resolve_target

MODEL = """
import torch, torch.nn.functional as F
torch.manual_seed(0)
W, B, G = torch.randn(16, 16), torch.randn(16), torch.ones(16) * 1.5


def block(x):
    b, t, c = x.shape
    h = F.linear(x, W, B).view(b, t, 2, 8).transpose(1, 2)
    a = torch.softmax(h @ h.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    o = (a @ h).transpose(1, 2).reshape(b, t, c)
    y = F.gelu(F.layer_norm(o + x, (c,), G))
    return y[:, :1, ...], torch.ops.aten.sym_size.int(y, 1)


def capture():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(block, backend=backend, dynamic=True)(torch.randn(2, 10, 16))
    return graphs[0]


def recipe(gm):
    # How to build the captured graph's args from x: dynamo lifts the globals to placeholders and
    # passes each symbolic size as a leading int (s0 = x.shape[d]).
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x_shape = [str(s) for s in next(n for n in ph if n.target == "L_x_").meta["example_value"].shape]
    out = []
    for n in ph:
        v = n.meta["example_value"]
        out.append(x_shape.index(str(v)) if isinstance(v, torch.SymInt) else n.target.split("_")[1].upper())
    return out


def make_args(rec, x):
    named = {"X": x, "W": W, "B": B, "G": G}
    return [int(x.shape[r]) if isinstance(r, int) else named[r] for r in rec]
"""


def _model():
    ns = {}
    exec(MODEL, ns)
    return ns


def test_dynamo_graph_roundtrip_dynamic():
    ns = _model()
    gm, _ = ns["capture"]()
    assert any(n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)
               for n in gm.graph.nodes), "expected a dynamic-shape graph"
    obj, tensors = graph_to_json(gm)
    text = json.dumps(obj, allow_nan=False)  # strict JSON
    targets = {n["target"] for n in obj["nodes"] if n["op"] == "call_function"}
    assert {"torch._C._nn.linear", "torch.nn.functional.layer_norm", "torch.softmax", "operator.add"} <= targets
    gm2 = graph_from_json(json.loads(text), tensors)
    for shape in [(2, 10, 16), (3, 37, 16), (1, 5, 16)]:
        x = torch.randn(shape)
        args = ns["make_args"](ns["recipe"](gm), x)
        want, got = gm(*args), gm2(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got[0], ns["block"](x)[0], rtol=0, atol=0)


def test_roundtrip_in_fresh_process(tmp_path):
    ns = _model()
    gm, _ = ns["capture"]()
    obj, tensors = graph_to_json(gm)
    (tmp_path / "g.json").write_text(json.dumps(obj))
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "t.safetensors"))
    x = torch.randn(3, 21, 16)
    rec = ns["recipe"](gm)
    want = gm(*ns["make_args"](rec, x))[0]
    save_file({"x": x, "want": want.contiguous()}, str(tmp_path / "io.safetensors"))
    out = run_python(MODEL + f"""
import json
from safetensors.torch import load_file
from effcompile.runtime.serialize import graph_from_json
d = {str(tmp_path)!r}
gm = graph_from_json(json.load(open(d + "/g.json")), load_file(d + "/t.safetensors"))
io = load_file(d + "/io.safetensors")
print(torch.equal(gm(*make_args({rec!r}, io["x"]))[0], io["want"]))
""")
    assert out.strip() == "True"


C = torch.randn(3)


def _fx_fn(x):
    y = torch.ops.aten.add.Tensor(x, C)[..., 1:]
    z = y.to(torch.float64, memory_format=torch.contiguous_format) * float("inf")
    return {"z": z, "n": torch.nan_to_num(z, posinf=-math.inf), "s": y.new_zeros(torch.Size([2]), layout=torch.strided)}


def test_fx_constants_and_special_args():
    gm = fx.symbolic_trace(_fx_fn)
    obj, tensors = graph_to_json(gm)
    assert list(tensors) == ["_tensor_constant0"] and torch.equal(tensors["_tensor_constant0"], C)
    gm2 = graph_from_json(json.loads(json.dumps(obj, allow_nan=False)), tensors)
    x = torch.randn(3)
    a, b = gm(x), gm2(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parameters_stay_parameters():
    gm = fx.symbolic_trace(torch.nn.Linear(3, 2))
    gm.graph.eliminate_dead_code()
    for n in list(gm.graph.nodes):  # make the IR form: no call_module
        if n.op == "call_module":
            with gm.graph.inserting_before(n):
                w, b = gm.graph.get_attr("weight"), gm.graph.get_attr("bias")
                n.replace_all_uses_with(gm.graph.call_function(F.linear, (n.args[0], w, b)))
            gm.graph.erase_node(n)
    gm.recompile()
    obj, tensors = graph_to_json(gm)
    gm2 = graph_from_json(obj, tensors)
    assert isinstance(gm2.weight, torch.nn.Parameter)
    x = torch.randn(4, 3)
    assert torch.equal(gm(x), gm2(x))


def test_tensors_come_back_on_their_device():
    # safetensors loads every tensor to the CPU; a graph compiled for CUDA must get its weights back there
    # (else each call copies them to the GPU). "meta" stands in for a second device on a CPU-only machine.
    gm = fx.symbolic_trace(_fx_fn)
    obj, tensors = graph_to_json(gm)
    assert obj["attrs"]["_tensor_constant0"]["device"] == "cpu"
    obj["attrs"]["_tensor_constant0"]["device"] = "meta"
    assert graph_from_json(obj, tensors)._tensor_constant0.device.type == "meta"
    del obj["attrs"]["_tensor_constant0"]["device"]  # no device recorded: the CPU, as before
    assert graph_from_json(obj, tensors)._tensor_constant0.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process without CUDA")
def test_tensor_from_unreachable_device_refused():
    gm = fx.symbolic_trace(_fx_fn)
    obj, tensors = graph_to_json(gm)
    obj["attrs"]["_tensor_constant0"]["device"] = "cuda:0"
    with pytest.raises(NotSerializable, match="_tensor_constant0 was stored from cuda:0"):
        graph_from_json(obj, tensors)


def test_lambda_target_not_serializable():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(lambda t: t + 1, (x,)))
    with pytest.raises(NotSerializable, match="lambda"):
        graph_to_json(fx.GraphModule({}, g))


def test_local_function_and_call_module_not_serializable():
    def local(t):
        return t * 2

    g = fx.Graph()
    g.output(g.call_function(local, (g.placeholder("x"),)))
    with pytest.raises(NotSerializable):
        graph_to_json(fx.GraphModule({}, g))
    with pytest.raises(NotSerializable, match="call_module"):
        graph_to_json(fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU())))


@pytest.mark.parametrize("name", ["torch.os.system", "builtins.eval", "builtins.__import__", "torch.load",
                                  "subprocess.run", "torch.__builtins__", "effcompile.runtime.cache.shutil.rmtree",
                                  "torch.ops.effcompile.not_registered_op.default", "torch.utils.cpp_extension.load"])
def test_resolve_refuses(name):
    with pytest.raises(NotSerializable):
        resolve_target(name)


def test_malicious_json_refused():
    gm = fx.symbolic_trace(lambda x: x + 1)
    obj, tensors = graph_to_json(gm)
    bad = json.loads(json.dumps(obj))
    bad["nodes"][0]["name"] = "x; import os"
    with pytest.raises(NotSerializable, match="identifier"):
        graph_from_json(bad, tensors)
    bad = json.loads(json.dumps(obj))
    bad["nodes"][1]["target"] = "builtins.exec"
    with pytest.raises(NotSerializable):
        graph_from_json(bad, tensors)
    with pytest.raises(NotSerializable, match="format"):
        graph_from_json({**obj, "format": 99}, tensors)
