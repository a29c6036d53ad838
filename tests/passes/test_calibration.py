"""passes/calibration.py: collect_stats_in_order runs the batches in lockstep and lets a fit change what the nodes
after it compute within the same pass; with no fit it records exactly what collect_stats records."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from effcompile.compiler.pass_manager import PassContext
from effcompile.passes.calibration import collect_stats, collect_stats_in_order


class _Two(torch.nn.Module):
    """y = x * scale; z = relu(y - shift): ``shift`` is the buffer a fit at y sets, z reads it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("shift", torch.tensor(0.0))

    def forward(self, x):
        y = x * self.scale
        return torch.relu(y - self.shift)


def _graph():
    gm = fx.symbolic_trace(_Two())
    nodes = {n.name: n for n in gm.graph.nodes}
    return gm, nodes["mul"], nodes["relu"]


def _ctx(batches):
    return PassContext(batches[0], batches, {})


BATCHES = [(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)] + [
    (torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(9)),)]  # another shape in the same pass


def test_without_a_fit_it_records_what_collect_stats_records():
    gm, mul, relu = _graph()
    ctx = _ctx(BATCHES)
    want = collect_stats(gm, ctx, [mul, relu], rows=16)
    calls = []
    got = collect_stats_in_order(gm, ctx, [mul, relu], lambda name, st: calls.append((name, st.count)), rows=16)
    assert set(got) == set(want) == {"mul", "relu"}
    for name in want:
        a, b = got[name], want[name]
        assert a.count == b.count == 3 * 15 + 14
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.abs_sum, b.abs_sum) and torch.equal(a.rows, b.rows)
        assert torch.equal(torch.cat(a.sample), torch.cat(b.sample))
    # once per watched node, in graph order, after every batch was recorded
    assert calls == [("mul", 59), ("relu", 59)]


def test_a_fit_changes_the_nodes_after_it_in_the_same_pass():
    gm, mul, relu = _graph()

    def fit(name, st):
        if name == "mul":  # shift z by y's largest |value|: z is then 0 for every batch
            gm.shift.fill_(float(st.absmax.max()))

    got = collect_stats_in_order(gm, _ctx(BATCHES), [mul, relu], fit)
    assert float(gm.shift) == pytest.approx(2 * max(float(b[0].abs().max()) for b in BATCHES))
    assert float(got["relu"].absmax.max()) == 0.0  # every batch's z saw the fitted shift
    assert float(collect_stats(gm, _ctx(BATCHES), [relu])["relu"].absmax.max()) == 0.0  # as a later run does


def test_no_calibration_data_is_a_clear_error():
    gm, mul, _ = _graph()
    with pytest.raises(ValueError, match=r"calibration=\[batch, \.\.\.\]"):
        collect_stats_in_order(gm, PassContext((torch.zeros(1),), [], {}), [mul], lambda *_: None)
