"""Find the first pass (or codegen) that pushes a model's output beyond a tolerance of eager."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler.pass_manager import Instrument, PassContext, PassManager

CAPTURED, CODEGEN = "captured", "codegen"


@dataclass
class Stage:
    """The model's output with the pipeline cut after one stage, compared to eager."""

    name: str  # "captured" (no pass), a pass name, or "codegen" (after every pass)
    config: str = ""
    max_abs: float = 0.0
    ratio: float = 0.0  # max |out - ref| / (atol + rtol * |ref|): > 1 means beyond tolerance
    ok: bool = True
    fired: bool = False
    note: str = ""


@dataclass
class BisectResult:
    stages: list[Stage] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def culprit(self) -> Stage | None:
        """The first stage beyond tolerance; ``None`` when the whole pipeline stays within it."""
        return next((s for s in self.stages if not s.ok), None)

    def __str__(self) -> str:
        lines = [f"effcompile bisect: tolerance atol={self.atol:g} rtol={self.rtol:g} (vs eager)",
                 f"  {'#':>2}  {'stage':<24} {'config':<34} {'fired':<5} {'max |diff|':>10} {'x tol':>8}  verdict"]
        for i, s in enumerate(self.stages):
            verdict = "ok" if s.ok else "BEYOND TOLERANCE"
            cfg = s.config if len(s.config) <= 34 else s.config[:31] + "..."
            lines.append(f"  {i:>2}  {s.name:<24} {cfg:<34} {'yes' if s.fired else '-':<5} {s.max_abs:>10.3e} "
                         f"{s.ratio:>8.3g}  {verdict}{'  (' + s.note + ')' if s.note else ''}")
        c = self.culprit
        lines.append(f"first stage beyond tolerance: {c.name} {c.config}".rstrip() if c else
                     "every stage is within tolerance")
        return "\n".join(lines)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in a fixed order (tuples, dicts, HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = [out[k] for k in sorted(out)]
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return []


def _compare(out, ref, atol: float, rtol: float) -> tuple[float, float, str]:
    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        return float("inf"), float("inf"), f"{len(outs)} output tensors, eager has {len(refs)}"
    max_abs = ratio = 0.0
    for o, r in zip(outs, refs, strict=True):
        if o.shape != r.shape:
            return float("inf"), float("inf"), f"shape {list(o.shape)} vs eager {list(r.shape)}"
        if not o.is_floating_point():  # ids, masks: any difference is beyond any tolerance
            if not torch.equal(o, r):
                max_abs, ratio = max(max_abs, (o.double() - r.double()).abs().max().item()), float("inf")
            continue
        d = (o.double() - r.double()).abs()
        d = torch.where(torch.isnan(o) & torch.isnan(r), torch.zeros_like(d), d.nan_to_num(float("inf")))
        if d.numel():
            max_abs = max(max_abs, d.max().item())
            ratio = max(ratio, (d / (atol + rtol * r.double().abs())).max().item())
    return max_abs, ratio, ""


class _Snapshots(Instrument):
    """Keeps a runnable copy of the graph after every pass that ran."""

    def __init__(self):
        self.stages: list[tuple[str, str, bool, fx.GraphModule]] = []

    def after(self, entry, gm, record):
        self.stages.append((record.name, repr(record.config), record.modified, ir.copy_graph_module(gm)))


class _StagedGraph:
    """A captured graph that runs the version selected by ``state["stage"]`` (built on first use)."""

    def __init__(self, gm, example_inputs, settings, state: dict):
        from effcompile.compiler.api import _tensor_inputs

        self.pristine, self.example_inputs, self.settings, self.state = gm, list(example_inputs), settings, state
        self.signature = tuple(_tensor_inputs(gm))
        self.versions: list[tuple[str, str, bool, Any, str]] | None = None

    def _build(self) -> None:
        from effcompile.codegen.lower import lower
        from effcompile.compiler.api import _replay_args
        from effcompile.compiler.backend import _params

        gm = ir.copy_graph_module(self.pristine)
        ir.annotate(gm, self.example_inputs)
        replays = [_replay_args(gm, r) for r in self.state["recordings"].get(self.signature, [])]
        ctx = PassContext(self.example_inputs, [r for r in replays if r is not None] or None,
                          _params(gm, self.example_inputs), self.settings.opt_level)
        snaps = _Snapshots()
        PassManager(self.settings.passes, opt_level=self.settings.opt_level, instruments=[snaps]).run(gm, ctx)
        versions = [(CAPTURED, "", False, ir.copy_graph_module(self.pristine).forward, "")]
        versions += [(name, cfg, fired, g.forward, "") for name, cfg, fired, g in snaps.stages]
        try:  # codegen rewrites in place, so it gets its own copy of the final graph
            final = ir.copy_graph_module(gm)
            lowered = lower(final, tempfile.mkdtemp(prefix="effcompile-bisect-"), use_triton=self.settings.use_triton)
            versions.append((CODEGEN, "", bool(lowered.kernels), final.forward, f"{len(lowered.kernels)} kernel(s)"))
        except Exception as e:  # the real backend falls back to torch ops here; the bisector says so
            versions.append((CODEGEN, "", False, gm.forward, f"codegen failed ({type(e).__name__}: {e})"))
        self.versions = versions

    def __call__(self, *args):
        if self.state["recording"]:
            names = [n.name for n in self.pristine.graph.nodes if n.op == "placeholder"]
            rec = {k: v for k, v in zip(names, args, strict=True) if isinstance(v, torch.Tensor)}
            self.state["recordings"].setdefault(self.signature, []).append(rec)
            return self.pristine(*args)
        if self.versions is None:
            self._build()
        with torch.no_grad():
            return self.versions[self.state["stage"]][3](*args)


def _call(fn, inputs):
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, list | tuple):
        return fn(*inputs)
    return fn(inputs)


def bisect(model, inputs, passes=None, *, atol: float = 1e-4, rtol: float = 1e-4, calibration=None,
           opt_level: int = 1, use_triton: bool | None = None) -> BisectResult:
    """Run ``model`` with the pipeline cut after each stage and compare every output to eager.

    Stages, in the order the compiler runs them: the captured graph with no pass, each pass in phase
    order (the default exact passes included, as ``effcompile()`` runs them), then codegen after all
    passes. ``inputs`` is a tuple of positional args or a dict of keyword args; ``calibration`` is what
    ``effcompile(..., calibration=)`` takes. The first stage whose output is not within
    ``atol + rtol * |eager|`` everywhere is ``result.culprit``.

    Example::

        r = bisect(model, {"input_ids": ids}, [ThresholdChannels(sparsity=0.5)], atol=1e-3, rtol=1e-3)
        print(r)                      # a table: every stage, its max |diff| and verdict
        r.culprit.name                # e.g. "threshold_channels"
    """
    from effcompile.compiler.api import _make_settings

    if not callable(model):
        raise TypeError(f"bisect() needs a callable model, got {type(model).__name__}")
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    settings = _make_settings(passes, calibration, None, False, opt_level, use_triton)
    state: dict = {"stage": 0, "recording": False, "recordings": {}}
    graphs: list[_StagedGraph] = []

    def backend(gm, example_inputs):
        graphs.append(_StagedGraph(gm, example_inputs, settings, state))
        return graphs[-1]

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        ref = _call(model, inputs)
        if calibration is not None:
            state["recording"] = True
            try:
                for batch in calibration:
                    _call(compiled, batch)
            finally:
                state["recording"] = False
        _call(compiled, inputs)  # captures (or reuses) the graphs and builds every stage
        built = [g for g in graphs if g.versions is not None]
        if not built:
            # Never a silent "all stages equal eager": with no graph, nothing was compiled at all.
            raise RuntimeError("dynamo captured no graph for this model (recompile limit reached? "
                               "see torch._dynamo.config.recompile_limit); nothing to bisect")
        n = len(built[0].versions)
        result = BisectResult(atol=atol, rtol=rtol)
        for k in range(n):
            state["stage"] = k
            out = _call(compiled, inputs)
            name, cfg, _, _, note = built[0].versions[k]
            max_abs, ratio, why = _compare(out, ref, atol, rtol)
            fired = any(g.versions[k][2] for g in built)
            notes = "; ".join(x for x in (why, note) if x)
            result.stages.append(Stage(name, cfg, max_abs, ratio, ratio <= 1.0, fired, notes))
    return result


# -- command line: `effcompile bisect <model> --passes SPEC` (registered in effcompile/cli.py) ------------


def _import(what: str) -> None:
    """Import a module name or a .py file (e.g. one that registers custom passes), once."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if not what.endswith(".py"):
        importlib.import_module(what)
        return
    path = Path(what).resolve()
    loaded = sys.modules.get(path.stem)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return  # importing it twice would register a second, different config class of the same name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None:
        raise SystemExit(f"effcompile bisect: cannot import {what}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)


def _parse_passes(text: str) -> list:
    """The bench spec syntax (``quantize(weights=int4,group_size=64)+remove_dropout``) when effcompile.bench
    has it; otherwise Python-like ``ClassName(k=v)+...`` of registered config classes (values are literals)."""
    try:
        from effcompile.bench.spec import parse_passes
    except ImportError:
        pass
    else:
        return parse_passes(text)[1]
    import ast

    from effcompile.compiler.pass_manager import registered_passes

    if text.strip().lower() in ("", "none"):
        return []
    by_name = {c.__name__: c for c in registered_passes()}
    configs = []
    for item in text.split("+"):
        try:
            node = ast.parse(item.strip(), mode="eval").body
            call = node if isinstance(node, ast.Call) else ast.Call(node, [], [])
            cls = by_name[call.func.id]
            configs.append(cls(**{k.arg: ast.literal_eval(k.value) for k in call.keywords}))
        except (SyntaxError, AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot parse pass {item.strip()!r} ({type(e).__name__}: {e}); "
                             f"registered: {sorted(by_name)}") from None
    return configs


def _cli(args) -> int:
    import json

    from effcompile.cli import _explain_model

    for what in args.imports:
        _import(what)
    try:
        passes = _parse_passes(args.passes)
    except ValueError as e:  # SpecError: names the bad part and the valid names
        raise SystemExit(f"effcompile bisect: {e}") from None
    model, inputs = _explain_model(args.model, args.batch, args.seq)
    # A calibrated pass is bisected on the model's own batch (the command has no data set option).
    calibration = [inputs] if any(getattr(p, "needs_calibration", False) for p in passes) else None
    result = bisect(model, inputs, passes, atol=args.atol, rtol=args.rtol, calibration=calibration,
                    use_triton=False if args.no_triton else None)
    if args.json:
        print(json.dumps({"atol": result.atol, "rtol": result.rtol, "culprit": result.culprit and result.culprit.name,
                          "stages": [vars(s) for s in result.stages]}, indent=1, default=str))
    else:
        print(result)
    return 1 if result.culprit else 0  # scriptable: non-zero when some stage is beyond tolerance


def add_cli(sub) -> None:
    from effcompile.cli import EXPLAIN_MODELS

    p = sub.add_parser("bisect", help="find the first pass (or codegen) that pushes a model's output beyond a "
                       "tolerance; exit code 1 when one does")
    p.add_argument("model", help="one of: " + ", ".join(EXPLAIN_MODELS))
    p.add_argument("--passes", default="none", help="pass spec, e.g. 'quantize(weights=int8)+remove_dropout' "
                   "(the default exact passes always run first, as in effcompile())")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import this first (a module or .py file registering custom passes); repeatable")
    p.add_argument("--no-triton", action="store_true", help="run generated kernels' torch path only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cli)
