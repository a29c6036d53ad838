"""PassManager: phase order, opt levels, requires, instruments, invariant checks that name the pass."""

from dataclasses import dataclass

import pytest
import torch

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import (
    Instrument,
    PassConfig,
    PassContext,
    PassFailed,
    PassManager,
    PassResult,
    register_pass,
)
from effcompile.testing import capture

RAN: list[str] = []


@dataclass(frozen=True)
class _Late(PassConfig):
    pass


@dataclass(frozen=True)
class _Early(PassConfig):
    pass


@dataclass(frozen=True)
class _NeedsEarly(PassConfig):
    pass


@dataclass(frozen=True)
class _Expensive(PassConfig):
    pass


@dataclass(frozen=True)
class _Breaks(PassConfig):
    pass


@register_pass(_Late, phase="fuse")
def late(gm, cfg, ctx):
    RAN.append("late")
    return PassResult(modified=False)


@register_pass(_Early, phase="canonicalize")
def early(gm, cfg, ctx):
    RAN.append("early")
    return PassResult(modified=False)


@register_pass(_NeedsEarly, phase="fuse", requires=("early",))
def needs_early(gm, cfg, ctx):
    RAN.append("needs_early")
    return PassResult(modified=False)


@register_pass(_Expensive, phase="fuse", opt_level=2)
def expensive(gm, cfg, ctx):
    RAN.append("expensive")
    return PassResult(modified=False)


@register_pass(_Breaks, phase="fuse", invalidates=())
def breaks(gm, cfg, ctx):
    # Adds a node and (wrongly) claims nothing needs recomputing: no meta['val'] on it.
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0][0] if isinstance(out.args[0], tuple | list) else out.args[0]
    with gm.graph.inserting_before(out):
        new = gm.graph.call_function(torch.neg, (src,))
    new.meta[ir.TAG] = ir.Sublayer("other")
    out.replace_input_with(src, new)
    return PassResult(modified=True, count=1)


@pytest.fixture
def graph():
    gm, example = capture(lambda x: torch.relu(x) + 1, torch.randn(2, 3))[0]
    ir.annotate(gm, example)
    RAN.clear()
    return gm, PassContext(example)


def test_phases_run_in_order_whatever_the_list_order(graph):
    gm, ctx = graph
    records = PassManager([_Late(), _Early()]).run(gm, ctx)
    assert RAN == ["early", "late"]
    assert [r.phase for r in records] == ["canonicalize", "fuse"]


def test_requires_is_checked(graph):
    gm, ctx = graph
    PassManager([_NeedsEarly(), _Early()]).run(gm, ctx)  # reordered by phase: fine
    assert RAN == ["early", "needs_early"]
    with pytest.raises(PassFailed, match="needs_early requires"):
        PassManager([_NeedsEarly()]).run(gm, ctx)


def test_opt_level_skips_and_says_why(graph):
    gm, ctx = graph
    (rec,) = PassManager([_Expensive()], opt_level=1).run(gm, ctx)
    assert not rec.ran and "opt_level>=2" in rec.note and RAN == []
    PassManager([_Expensive()], opt_level=2).run(gm, ctx)
    assert RAN == ["expensive"]


def test_instruments_see_every_pass_with_timing(graph):
    gm, ctx = graph
    seen = []

    class Spy(Instrument):
        def before(self, entry, gm):
            seen.append(("before", entry.name))

        def after(self, entry, gm, record):
            seen.append(("after", entry.name, record.seconds >= 0))

    PassManager([_Early(), _Late()], instruments=[Spy()]).run(gm, ctx)
    assert seen == [("before", "early"), ("after", "early", True), ("before", "late"), ("after", "late", True)]


def test_invariant_failure_names_the_pass(graph, monkeypatch):
    gm, ctx = graph
    monkeypatch.setenv("EFFCOMPILE_CHECKS", "1")
    with pytest.raises(PassFailed, match=r"after pass breaks.*ran before: \['early'\]"):
        PassManager([_Early(), _Breaks()]).run(gm, ctx)


def test_bad_registrations_and_configs_are_clear_errors():
    @dataclass
    class NotFrozen:
        pass

    with pytest.raises(TypeError, match="frozen"):
        register_pass(NotFrozen)
    with pytest.raises(ValueError, match="phase"):
        register_pass(_Late, phase="nope")
    with pytest.raises(TypeError, match="instances"):
        PassManager([_Late])

    @dataclass(frozen=True)
    class Unregistered(PassConfig):
        pass

    with pytest.raises(ValueError, match="no pass registered for Unregistered"):
        PassManager([Unregistered()])
