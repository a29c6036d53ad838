"""Guards: bucketed dynamic dims, exact static dims, readable failure reasons."""

import torch

from effcompile.runtime.guards import dynamic_dims_of, make_guard, placeholder_values


def test_inside_and_outside_bucket():
    g = make_guard([torch.randn(2, 100, 8), 3], dynamic={0: [1]})
    assert g.check([torch.randn(2, 65, 8), 3]) is None
    assert g.check([torch.randn(2, 128, 8), 3]) is None
    assert g.check([torch.randn(2, 300, 8), 3]) == "arg 0 dim 1: 300 not in bucket 65-128"
    assert g.check([torch.randn(2, 64, 8), 3]) == "arg 0 dim 1: 64 not in bucket 65-128"
    assert g.check([torch.randn(3, 100, 8), 3]) == "arg 0 dim 0: 3, expected 2"
    assert g.check([torch.randn(2, 100, 8), 4]) == "arg 1: 4, expected 3"


def test_dtype_device_rank_count_layout():
    g = make_guard([torch.randn(2, 100, 8)], dynamic={0: [-2]})
    assert g.check([torch.randn(2, 100, 8).half()]) == "arg 0: dtype torch.float16, expected torch.float32"
    assert g.check([torch.empty(2, 100, 8, device="meta")]) == "arg 0: device meta, expected cpu"
    assert g.check([torch.randn(2, 100)]) == "arg 0: rank 2, expected 3"
    assert g.check([]) == "expected 1 args, got 0"
    assert g.check([5]) == "arg 0: expected a tensor, got int"
    assert g.check([torch.randn(2, 8, 100).transpose(1, 2)]) == "arg 0: layout other, expected contiguous"
    assert "65-128" in str(g)


def test_dynamic_dims_from_dynamo_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: (x * 2).sum(-1), backend=backend, dynamic=True)(torch.randn(4, 100))
    gm, ex = graphs[0]
    fakes = placeholder_values(gm)
    dyn = dynamic_dims_of(fakes)
    assert dyn, "dynamo marked nothing dynamic"
    g = make_guard(ex, fake_inputs=fakes)
    # The SymInt placeholders become int args checked against their own bucket.
    args_ok = [v if not isinstance(v, torch.Tensor) else torch.randn(4, 120) for v in ex]
    args_ok = [120 if isinstance(v, int) and v == 100 else (4 if isinstance(v, int) else v) for v in args_ok]
    assert g.check(args_ok) is None, g.check(args_ok)
    args_bad = [300 if isinstance(v, int) and v == 120 else v for v in args_ok]
    args_bad = [torch.randn(4, 300) if isinstance(v, torch.Tensor) else v for v in args_bad]
    assert "not in bucket 65-128" in g.check(args_bad)
    assert g.input_specs(args_ok) == g.input_specs([*ex])


def test_static_when_nothing_dynamic():
    g = make_guard([torch.randn(2, 100)])
    assert g.check([torch.randn(2, 101)]) == "arg 0 dim 1: 101, expected 100"
