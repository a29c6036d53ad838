"""Declarative rewrites: identity for the cache key, validation, and passes with no source to hash."""

from dataclasses import dataclass

import pytest
import torch

import effcompile as ec
from effcompile.compiler.pass_manager import PassConfig, PassResult, register_pass


def _relu(x):
    return torch.relu(x)


def _relu_as_clamp(x):
    return torch.clamp(x, min=0.0)


def _relu_as_max(x):
    return torch.maximum(x, torch.zeros_like(x))


def test_rewrite_identity_follows_pattern_and_replacement_source():
    a = ec.rewrite("ReluClamp", _relu, _relu_as_clamp)
    b = ec.rewrite("ReluMax", _relu, _relu_as_max)
    assert a.version and b.version and a.version != b.version


def test_rewrite_fires_and_is_exact():
    relu_clamp = ec.rewrite("ReluClampExact", _relu, _relu_as_clamp)
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))))

    model = Net()
    fast = ec.effcompile(model, passes=[relu_clamp()], cache=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fast(x), model(x))
    (rec,) = [p for p in ec.explain(fast).graphs[0].passes if p.name == "ReluClampExact"]
    assert rec.count == 2


def test_rewrite_validates_its_inputs():
    with pytest.raises(ValueError, match="identifier"):
        ec.rewrite("not a name", _relu, _relu_as_clamp)
    with pytest.raises(ValueError, match="takes 1 tensors but replacement takes 2"):
        ec.rewrite("Arity", _relu, lambda x, y: x + y)


def test_a_pass_without_source_compiles_but_is_not_cached(tmp_path):
    namespace = {"torch": torch, "PassResult": PassResult}
    exec("def no_source_pass(gm, cfg, ctx):\n    return PassResult(modified=False)\n", namespace)

    @dataclass(frozen=True)
    class NoSource(PassConfig):
        pass

    register_pass(NoSource, phase="fuse")(namespace["no_source_pass"])
    model = torch.nn.Linear(4, 4)
    fast = ec.effcompile(model, passes=[NoSource()], cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fast(torch.ones(1, 4)), model(torch.ones(1, 4)))
    graph = ec.explain(fast).graphs[0]
    assert graph.cache == "off" and "not cacheable" in graph.cache_note
