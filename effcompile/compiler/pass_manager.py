"""The pass manager: registered passes run in ordered phases, timed, counted and checked.

A pass is a frozen config dataclass plus a pure function ``fn(gm, cfg, ctx) -> PassResult`` registered
under the config's type (torchao style). The manager:

* orders passes by phase (``PHASES``), keeping the user's order inside a phase;
* skips passes whose ``opt_level`` is above the requested one (and says so in the report);
* checks ``requires`` (a pass named there must run earlier) and reruns the analyses a pass
  ``invalidates`` (``"meta"`` -> shape propagation, ``"tags"`` -> sublayer tagging);
* calls instruments before and after every pass (timing, debug dumps);
* with ``EFFCOMPILE_CHECKS=1`` lints the graph and checks IR invariants after every pass, and a failure
  names the pass that broke it and the passes that ran before.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from effcompile import config
from effcompile.compiler import ir

log = logging.getLogger("effcompile.passes")

PHASES = ("canonicalize", "semantic", "quantize", "fuse")


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen (hashable, part of the cache key) and validated."""

    lossy: ClassVar[bool] = False
    version: ClassVar[int] = 1


@dataclass
class PassResult:
    """What a pass did: ``count`` rewrites at ``where`` (node names or sublayer tags)."""

    modified: bool
    count: int = 0
    where: list[str] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # calibration decisions, shown by explain()
    note: str = ""  # why it did not apply, when it did not

    @classmethod
    def rewrites(cls, where: list[str], skipped: dict[str, str]) -> PassResult:
        """A pass that rewrote at ``where`` and left the sites in ``skipped`` (site -> why) alone."""
        return cls(modified=bool(where), count=len(where), where=where,
                   note="; ".join(f"{k}: {v}" for k, v in skipped.items()))


@dataclass
class PassContext:
    """What a pass may read besides the graph: example inputs, calibration data, the real parameters."""

    example_inputs: Sequence[Any] = ()
    calibration: Iterable[Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # placeholder name -> real tensor, when known
    opt_level: int = 1
    # One per compiled model: what a pass made that the model's other graphs may reuse (Quantize's packed
    # weights), so it lives as long as the compiled model and no longer.
    shared: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredPass:
    config_type: type
    fn: Callable[[fx.GraphModule, Any, PassContext], PassResult]
    name: str
    phase: str
    opt_level: int
    requires: tuple[str, ...]
    invalidates: tuple[str, ...]


_REGISTRY: dict[type, RegisteredPass] = {}


def register_pass(
    config_type: type,
    *,
    phase: str = "fuse",
    name: str | None = None,
    opt_level: int = 1,
    requires: Sequence[str] = (),
    invalidates: Sequence[str] = ("meta",),
):
    """Register ``fn(gm, cfg, ctx) -> PassResult`` as the implementation of ``config_type``.

    Example::

        @dataclass(frozen=True)
        class DropIdentityViews(PassConfig): ...

        @register_pass(DropIdentityViews, phase="canonicalize")
        def drop_identity_views(gm, cfg, ctx):
            ...
            return PassResult(modified=n > 0, count=n)
    """
    if not (isinstance(config_type, type) and dataclasses.is_dataclass(config_type)):
        raise TypeError(f"register_pass needs a dataclass type, got {config_type!r}")
    if not config_type.__dataclass_params__.frozen:
        raise TypeError(f"{config_type.__name__} must be a frozen dataclass (configs are cache-key parts)")
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {PHASES}")

    def wrap(fn):
        entry = RegisteredPass(
            config_type, fn, name or fn.__name__, phase, opt_level, tuple(requires), tuple(invalidates)
        )
        old = _REGISTRY.get(config_type)
        if old is not None and old.fn is not fn:
            log.warning("re-registering pass for %s: %s replaces %s", config_type.__name__, fn, old.fn)
        _REGISTRY[config_type] = entry
        return fn

    return wrap


def lookup(cfg: Any) -> RegisteredPass:
    if isinstance(cfg, type):
        raise TypeError(f"passes= takes config instances; got the class {cfg.__name__} (write {cfg.__name__}())")
    entry = _REGISTRY.get(type(cfg))
    if entry is None:
        from effcompile.passes import load_plugins

        load_plugins()
        entry = _REGISTRY.get(type(cfg))
    if entry is None:
        known = sorted(t.__name__ for t in _REGISTRY)
        raise ValueError(f"no pass registered for {type(cfg).__name__}; registered: {known}")
    return entry


def registered_passes() -> dict[type, RegisteredPass]:
    return dict(_REGISTRY)


@dataclass
class PassRecord:
    """One pass run, as explain() shows it."""

    name: str
    phase: str
    config: Any
    ran: bool
    modified: bool = False
    count: int = 0
    where: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    artifacts: dict[str, Any] = field(default_factory=dict)


class Instrument:
    """Hooks around every pass (override what you need)."""

    def before(self, entry: RegisteredPass, gm: fx.GraphModule) -> None: ...

    def after(self, entry: RegisteredPass, gm: fx.GraphModule, record: PassRecord) -> None: ...


class DebugDump(Instrument):
    """EFFCOMPILE_DEBUG>=1 logs each pass's counts; >=2 also prints the graph after it."""

    def after(self, entry, gm, record):
        level = config.debug_level()
        if level >= 1:
            log.info(
                "pass %-24s phase=%-12s fired=%s count=%d %.1f ms",
                record.name, record.phase, record.modified, record.count, record.seconds * 1e3,
            )
        if level >= 2:
            log.info("graph after %s:\n%s", record.name, gm.code)


class PassFailed(RuntimeError):
    """A pass raised, or broke an IR invariant; the message names the pass."""


class PassInputError(PassFailed, ValueError):
    """A pass refused its input with a ValueError (e.g. a layer name the graph does not have): still a
    ValueError for the user, and a PassFailed naming the pass for whoever drives the PassManager."""


class PassManager:
    """Runs pass configs over a graph in phase order. ``run`` returns one record per pass."""

    def __init__(self, passes: Sequence[Any], *, opt_level: int = 1, instruments: Sequence[Instrument] = ()):
        self.entries = [(cfg, lookup(cfg)) for cfg in passes]
        order = {p: i for i, p in enumerate(PHASES)}
        # Stable sort: the user's order survives inside each phase.
        self.entries.sort(key=lambda e: order[e[1].phase])
        self.opt_level = opt_level
        self.instruments = [DebugDump(), *instruments]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        done: list[str] = []
        checks = config.checks_enabled()
        for cfg, entry in self.entries:
            rec = PassRecord(entry.name, entry.phase, cfg, ran=False)
            records.append(rec)
            if entry.opt_level > self.opt_level:
                rec.note = f"skipped: needs opt_level>={entry.opt_level}, running at {self.opt_level}"
                log.info("pass %s %s", entry.name, rec.note)
                continue
            missing = [r for r in entry.requires if r not in done]
            if missing:
                raise PassFailed(f"pass {entry.name} requires {missing} to run before it; ran so far: {done}")
            for inst in self.instruments:
                inst.before(entry, gm)
            start = time.perf_counter()
            try:
                result = entry.fn(gm, cfg, ctx)
            except Exception as e:
                kind = PassInputError if isinstance(e, ValueError) else PassFailed
                raise kind(f"pass {entry.name} ({type(cfg).__name__}) failed: {e}; ran before: {done}") from e
            if not isinstance(result, PassResult):
                raise PassFailed(f"pass {entry.name} returned {type(result).__name__}, expected PassResult")
            if result.modified:
                gm.recompile()
                if "meta" in entry.invalidates:
                    ir.refresh_meta(gm, ctx.example_inputs)
                ir.tag_sublayers(gm) if "tags" in entry.invalidates else _tag_new_nodes(gm)
            rec.ran, rec.modified, rec.count = True, result.modified, result.count
            rec.where, rec.note, rec.artifacts = list(result.where), result.note, dict(result.artifacts)
            rec.seconds = time.perf_counter() - start
            if checks:
                try:
                    ir.check_invariants(gm)
                except Exception as e:
                    raise PassFailed(f"IR invariant broken after pass {entry.name}: {e}; ran before: {done}") from e
            done.append(entry.name)
            for inst in self.instruments:
                inst.after(entry, gm, rec)
        return records


def _tag_new_nodes(gm: fx.GraphModule) -> None:
    """Nodes a pass created inherit the tag of the nearest tagged input (or user)."""
    for n in gm.graph.nodes:
        if n.op == "output" or ir.TAG in n.meta:
            continue
        near = [a.meta.get(ir.TAG) for a in n.all_input_nodes] + [u.meta.get(ir.TAG) for u in n.users]
        near = [t for t in near if t is not None]
        t = near[0] if near else ir.Sublayer("other")
        n.meta[ir.TAG] = ir.Sublayer(t.part, t.block, "op", t.module)
