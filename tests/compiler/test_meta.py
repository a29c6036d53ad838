"""Incremental metadata refresh (compiler/meta.py): recomputes what a rewrite made stale, and only that."""

import pytest
import torch
import torch.fx as fx

from effcompile.compiler import ir, meta
from effcompile.testing import capture, tiny_hf


class _Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(8, 8))

    def forward(self, x):
        for _ in range(20):
            x = torch.relu(x @ self.w) + 1
        return x.sum(-1)


def _graph(model=None, *inputs, dynamic=None):
    model = model or _Chain()
    inputs = inputs or (torch.randn(3, 8),)
    (gm, example), = capture(model, *inputs, dynamic=dynamic)
    ir.annotate(gm, example)
    return gm, example


def _vals(gm):
    return {n.name: meta._describe(n.meta.get(ir.VAL)) for n in gm.graph.nodes if n.op != "output"}


def test_untouched_graph_recomputes_nothing(monkeypatch):
    monkeypatch.setenv("EFFCOMPILE_CHECKS", "1")  # and a full propagation agrees
    gm, ex = _graph()
    assert meta.refresh_meta(gm, ex) == 0


def test_same_shape_rewrite_recomputes_only_the_rewritten_node():
    gm, ex = _graph()
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    relu.target = torch.nn.functional.gelu
    gm.recompile()
    assert meta.refresh_meta(gm, ex) == 1


def test_shape_change_flows_downstream_and_matches_a_full_propagation(monkeypatch):
    monkeypatch.setenv("EFFCOMPILE_CHECKS", "0")
    gm, ex = _graph()
    # The 10th relu now keeps a leading slice: every node after it changes shape.
    relus = [n for n in gm.graph.nodes if n.target is torch.relu]
    with gm.graph.inserting_after(relus[9]):
        cut = gm.graph.call_function(torch.narrow, (relus[9], 0, 0, 2))
    relus[9].replace_all_uses_with(cut, delete_user_cb=lambda u: u is not cut)
    gm.recompile()
    n_after = len(list(gm.graph.nodes)) - list(gm.graph.nodes).index(cut) - 1  # incl. output
    assert meta.refresh_meta(gm, ex) == n_after  # the new node and all below it, the output excepted
    assert tuple(gm.graph.find_nodes(op="output")[0].args[0][0].meta[ir.VAL].shape) == (2,)
    refreshed = _vals(gm)
    meta.propagate_meta(gm, ex)
    assert all(meta._same_leaf(tuple(refreshed[k]), tuple(v)) for k, v in _vals(gm).items())


def test_a_buffer_replaced_under_the_same_name_is_seen():
    class OneMatmul(_Chain):
        def forward(self, x):
            return torch.relu(x @ self.w)

    gm = fx.symbolic_trace(OneMatmul())  # weights as get_attr nodes, as passes add them (dynamo lifts them to inputs)
    ex = [torch.randn(3, 8)]
    ir.annotate(gm, ex)
    gm.w = torch.randn(8, 4)  # same attribute, new shape: downstream shapes change
    assert meta.refresh_meta(gm, ex) == 3  # w, the matmul, the relu
    assert tuple(gm.graph.find_nodes(op="output")[0].args[0].meta[ir.VAL].shape) == (3, 4)


def test_checks_catch_a_stale_value(monkeypatch):
    """With EFFCOMPILE_CHECKS the refresh is compared with a full propagation: a rewrite the fingerprint
    missed (here: fingerprints disabled) fails loudly instead of leaving wrong shapes for codegen."""
    monkeypatch.setenv("EFFCOMPILE_CHECKS", "1")
    gm, ex = _graph()
    monkeypatch.setattr(meta, "fingerprint", lambda n: ("same",))
    meta.record_fingerprints(gm)
    last = [n for n in gm.graph.nodes if n.target is torch.relu][-1]
    last.target, last.args = torch.narrow, (last.args[0], 0, 0, 2)
    gm.recompile()
    with pytest.raises(ir.InvariantError, match=f"left node {last.name} .*stale"):
        meta.refresh_meta(gm, ex)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_real_graphs_with_symbolic_sizes_refresh_to_what_a_full_propagation_gives(kind, monkeypatch):
    """Dynamo spells some sizes differently from a propagation (s0**2 + s0*s1 vs s0*(s0 + s1)): equal."""
    monkeypatch.setenv("EFFCOMPILE_CHECKS", "1")
    model = tiny_hf(kind, layers=2)
    torch._dynamo.reset()
    gm, ex = _graph(model, torch.randint(0, 128, (2, 9)), dynamic=True)
    assert any(isinstance(s, torch.SymInt) for n in gm.graph.nodes if isinstance(n.meta.get(ir.VAL), torch.Tensor)
               for s in n.meta[ir.VAL].shape)
    # Only a node without a value (a logging call's None) is run again; a full propagation agrees.
    assert meta.refresh_meta(gm, ex) == sum(n.op != "output" and n.meta.get(ir.VAL) is None for n in gm.graph.nodes)


def test_fingerprint_sees_arguments_by_node_name():
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    n = g.call_function(torch.add, (a, b))
    before = meta.fingerprint(n)
    n.args = (b, a)
    assert meta.fingerprint(n) != before
