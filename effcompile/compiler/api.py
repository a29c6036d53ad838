"""``effcompile(model)``: the call and decorator forms, and ``explain(compiled)``.

The compiled object is a drop-in replacement: same call signature and outputs. Under the hood the
model's forward is captured by dynamo with effcompile's backend; every graph dynamo produces becomes
a :class:`~effcompile.compiler.backend.CompiledGraph`. Graph breaks are counted on the first call and
shown by ``explain()``; ``fullgraph=True`` turns them into errors instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import warnings
from typing import Any

import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed

from effcompile.compiler.backend import CompiledGraph, Settings, backend_reports
from effcompile.compiler.pass_manager import PassInputError
from effcompile.runtime.report import Report

log = logging.getLogger("effcompile")


class _Compiler:
    """The state shared by a compiled module or function: settings, dynamo wrapper, report."""

    def __init__(self, fn, settings: Settings, dynamic: bool | None, fullgraph: bool):
        self.fn = fn
        self.report = Report()
        if settings.calibration is not None and not _calibrated(settings.passes):
            # Every calibration batch is a forward pass through an instrumented graph (17 s for llama-1b's
            # four on the CPU box): run none that no pass reads, and say so.
            note = ("calibration batches were given but no pass needs them (ThresholdChannels, Quantize with "
                    "smooth= or eora_rank=, SkipLayers choosing its layers): not run")
            self.report.notes.append(note)
            log.info("effcompile: %s", note)
            settings = dataclasses.replace(settings, calibration=None)
        self.settings = settings
        self.calls = 0
        self.recording = False  # True while calibration batches run through the captured graphs
        self.recordings: dict[tuple, list] = {}  # graph input names -> recorded input lists
        self.shared: dict = {}  # PassContext.shared of every graph of this model
        # Dynamo is not thread-safe about compiling (pytorch#105943): threads that miss its cache
        # together each compile the frame again, adding one duplicate graph per thread and using up
        # recompile_limit. Calls whose input signature has not completed yet are serialized; once
        # a signature has run, its calls go through dynamo's cache without the lock.
        self._lock = threading.RLock()
        self._warm: set = set()

        def backend(gm, example_inputs):
            if settings.calibration is None:
                return self._compile(gm, example_inputs, None)
            return _CalibratingGraph(self, gm, example_inputs)

        self.compiled = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)

    def _compile(self, gm, example_inputs, calibration_inputs):
        # A graph with no recordings of its own reuses other graphs' fits: their data goes in its cache key.
        model_calibration = None if self.settings.calibration is None or calibration_inputs else self.recordings
        graph = CompiledGraph(gm, example_inputs, self.settings, calibration_inputs, index=len(self.report.graphs),
                              model_calibration=model_calibration, shared=self.shared)
        self.report.graphs.append(graph.report)
        return graph

    def _calibrate(self) -> None:
        """Run the calibration batches through the captured graphs, recording each graph's inputs."""
        from tqdm.auto import tqdm

        self.recording = True
        try:
            with torch.no_grad():
                for batch in tqdm(self.settings.calibration, desc="effcompile calibration", leave=False):
                    if isinstance(batch, dict):
                        self.compiled(**batch)
                    elif isinstance(batch, list | tuple):
                        self.compiled(*batch)
                    else:
                        self.compiled(batch)
        finally:
            self.recording = False

    def __call__(self, *args, **kwargs):
        try:
            return self._call(args, kwargs)
        except BackendCompilerFailed as e:
            # dynamo wraps whatever our backend raised; a pass's ValueError is bad user input, so the
            # user gets it as itself (naming the pass and what is valid), not as a compiler crash.
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, PassInputError):
                raise inner  # noqa: B904 - keeps its own __cause__: the pass's ValueError and traceback
            raise
        except Exception as e:
            hint = _pruned_chunk_hint(self.fn, args, kwargs)
            if hint:
                raise ValueError(hint) from e
            raise

    def _call(self, args, kwargs):
        sig = _call_signature(args, kwargs)
        if sig is not None and sig in self._warm:
            return self.compiled(*args, **kwargs)
        with self._lock:
            out = self._call_locked(args, kwargs)
            if sig is not None and len(self._warm) < 4096:  # bounded: a stream of new shapes stays locked
                self._warm.add(sig)
            return out

    def _call_locked(self, args, kwargs):
        self.calls += 1
        if self.calls > 1:
            # A call with inputs this wrapper has not seen: dynamo may run it without any of our graphs, e.g. once
            # its recompile limit for this forward is used up (every torch.compile / effcompile wrapper of one model
            # shares it), and then says so only in its own log. Count our graphs' calls to tell.
            ran = sum(g.calls for g in self.report.graphs)
            out = self.compiled(*args, **kwargs)
            if not self.recording and self.report.graphs and sum(g.calls for g in self.report.graphs) == ran:
                self._ran_eagerly("a call with new input shapes ran without any compiled graph")
            return out
        from torch._dynamo.utils import counters

        before = dict(counters["graph_break"])
        if self.settings.calibration is not None:
            self._calibrate()
        out = self.compiled(*args, **kwargs)
        for reason, n in counters["graph_break"].items():
            if n > before.get(reason, 0):
                self.report.graph_breaks.append(str(reason).strip().splitlines()[0][:200])
                log.warning("effcompile: graph break: %s", self.report.graph_breaks[-1])
        if not self.report.graphs:
            # dynamo ran the call without handing us a graph: typically its recompile limit for this
            # code object is exhausted (torch._dynamo.config.recompile_limit), so it ran eagerly.
            self._ran_eagerly("dynamo compiled no graph on the first call")
        return out

    def _ran_eagerly(self, what: str) -> None:
        """Record (once per reason) and warn that a call ran the model eagerly."""
        from torch._dynamo.utils import counters

        limit = torch._dynamo.config.recompile_limit
        hit = any("recompile limit" in str(k).lower() for k in counters["unimplemented"])
        why = (f"dynamo hit its recompile limit in this process (torch._dynamo.config.recompile_limit = {limit}; "
               "every torch.compile / effcompile wrapper of one model counts against it: raise it to compile more)"
               if hit else "recompile limit reached for this forward? see torch._dynamo.config.recompile_limit")
        reason = f"{what} ({why}); the model ran eagerly"
        if reason in self.report.fallbacks:
            return
        self.report.fallbacks.append(reason)
        log.warning("effcompile: FALLBACK to eager: %s", reason)
        warnings.warn(f"effcompile: {reason}", RuntimeWarning, stacklevel=5)


def _pruned_chunk_hint(fn, args, kwargs) -> str | None:
    """Why a call failed, when it extends a PruneTokens cache by several tokens without the helper.

    Hugging Face builds one mask from block 0's cache length; the pruned blocks hold fewer entries, so
    the shapes disagree inside the model's Python (while dynamo traces it), before any pass runs.
    Only looked at after a failure, so ordinary calls pay nothing for it.
    """
    caches = [v for v in (*args, *kwargs.values()) if hasattr(v, "get_seq_length") and hasattr(v, "layers")]
    ids = next((v for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds")), None)
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if not caches or not isinstance(ids, torch.Tensor) or ids.dim() < 2 or ids.shape[1] < 2:
        return None
    try:
        lengths = [caches[0].get_seq_length(i) for i in range(len(caches[0].layers))]
    except Exception:  # a cache we cannot read: no diagnosis, the original error stands
        return None
    impl = getattr(getattr(fn, "config", None), "_attn_implementation", None)
    from effcompile.passes.prune_tokens import PRUNED_SDPA

    if len(set(lengths)) < 2 or impl == PRUNED_SDPA:
        return None
    return (f"a {ids.shape[1]}-token chunk extends a KV cache pruned by PruneTokens (cached lengths per block: "
            f"{lengths}); Hugging Face builds one attention mask from block 0's length, which does not fit the "
            f"pruned blocks. Call effcompile.passes.prune_tokens.enable_pruned_chunks(model) before compiling "
            f"(sdpa attention), or extend the cache one token per call")


def _call_signature(args, kwargs) -> tuple | None:
    """What dynamo's guards mostly depend on: tensor shapes/dtypes/devices, scalar values, grad mode.

    ``None`` (never "warm") when an argument is something we cannot summarize cheaply and safely.
    """
    parts: list = [torch.is_grad_enabled()]
    for v in (*args, *(kwargs[k] for k in sorted(kwargs))):
        if isinstance(v, torch.Tensor):
            parts.append((tuple(v.shape), v.dtype, v.device, v.requires_grad))
        elif v is None or isinstance(v, bool | int | float | str):
            parts.append((type(v), v))
        else:
            return None
    return (tuple(sorted(kwargs)), *parts)


def _tensor_inputs(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)]


def _replay_args(gm, recorded: dict[str, torch.Tensor]) -> list | None:
    """Arguments for ``gm`` from tensors recorded by name; size symbols are read off their shapes."""
    args = []
    for n in (n for n in gm.graph.nodes if n.op == "placeholder"):
        val = n.meta.get("example_value")
        if isinstance(val, torch.Tensor):
            if n.name not in recorded:
                return None
            t = recorded[n.name]
            # A graph is specialised on its static sizes (dynamo fixes size-1 dims even in dynamic
            # graphs): a recording of another size would run it on shapes it was not traced for.
            if t.dim() != val.dim() or any(isinstance(d, int) and d != s for d, s in zip(val.shape, t.shape, strict=True)):
                return None
            args.append(t)
        elif isinstance(val, torch.SymInt):
            size = next((recorded[p.name].shape[d] for p in gm.graph.nodes if p.op == "placeholder"
                         and p.name in recorded and isinstance(p.meta.get("example_value"), torch.Tensor)
                         for d, s in enumerate(p.meta["example_value"].shape) if str(s) == str(val)), None)
            if size is None:
                return None
            args.append(size)
        else:
            args.append(val)
    return args


class _CalibratingGraph:
    """A captured graph that records its inputs during calibration and compiles on its first real call.

    Recordings are pooled by the graph's tensor-input names: when dynamo recompiles the same forward
    for new sizes (automatic dynamic shapes), the new graph reads the same tensors and reuses them.
    """

    def __init__(self, owner: _Compiler, gm, example_inputs):
        self.owner, self.gm, self.example_inputs = owner, gm, list(example_inputs)
        self.signature = tuple(_tensor_inputs(gm))
        self.graph: CompiledGraph | None = None

    def __call__(self, *args):
        if self.owner.recording:
            names = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
            recorded = {k: v for k, v in zip(names, args, strict=True) if isinstance(v, torch.Tensor)}
            self.owner.recordings.setdefault(self.signature, []).append(recorded)
            return self.gm(*args)
        if self.graph is None:
            replays = [_replay_args(self.gm, r) for r in self.owner.recordings.get(self.signature, [])]
            replays = [r for r in replays if r is not None]
            self.graph = self.owner._compile(self.gm, self.example_inputs, replays or None)
        return self.graph(*args)


class CompiledModule(nn.Module):
    """An nn.Module compiled by effcompile; attributes and parameters are the original module's."""

    def __init__(self, module: nn.Module, compiler_args: dict):
        super().__init__()
        self._orig_mod = module
        self._ec = _Compiler(module, **compiler_args)

    def forward(self, *args, **kwargs):
        return self._ec(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)


def _calibrated(passes) -> list[str]:
    """The names of the passes (configs) that read calibration data."""
    return [type(p).__name__ for p in passes if getattr(p, "needs_calibration", False)]


def _make_settings(passes, calibration, cache_dir, cache, opt_level, use_triton) -> Settings:
    from effcompile.compiler.pipeline import default_passes

    if passes is not None:
        if not isinstance(passes, list | tuple):
            raise TypeError(f"passes must be a list of pass configs, got {type(passes).__name__}")
        user_types = {type(p) for p in passes}
        passes = [p for p in default_passes() if type(p) not in user_types] + list(passes)
    settings = Settings.make(passes=passes, opt_level=opt_level, cache_dir=cache_dir, cache=cache,
                             use_triton=use_triton, calibration=calibration)
    needing = _calibrated(settings.passes)
    if needing and calibration is None:
        raise ValueError(f"calibration= is required by pass(es) {needing}: give an iterable of example batches")
    return settings


def effcompile(
    obj: Any = None,
    *,
    passes: list | None = None,
    calibration: Any = None,
    dynamic: bool | None = None,
    cache_dir: str | None = None,
    cache: bool = True,
    opt_level: int = 1,
    use_triton: bool | None = None,
    fullgraph: bool = False,
):
    """Compile a model or function for inference; usable as a call or a decorator.

    Args:
        obj: an ``nn.Module``, an ``nn.Module`` subclass (decorator on a class) or a function.
        passes: pass configs run after the default exact ones (e.g. ``[RemoveDropout()]``);
            ``None`` means the default exact pipeline (canonicalize + fused kernels).
        calibration: example batches (tuples of args or dicts of kwargs) for calibrated lossy passes;
            not run when no pass reads them (``explain()`` notes it).
        dynamic: passed to dynamo (``None`` = specialise first, generalise on the first size change).
        cache_dir: compiled-graph cache directory (default ``$EFFCOMPILE_CACHE_DIR`` or the per-user one).
        cache: ``False`` keeps compiled graphs in memory only.
        opt_level: 0 runs the captured graph as is; 1 (default) runs passes and codegen.
        use_triton: ``None`` runs Triton where it can (CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``False`` always runs the generated kernels' torch path.
        fullgraph: raise on graph breaks instead of compiling the pieces.

    Example::

        fast = effcompile(model)
        y = fast(**batch)
        print(explain(fast))
    """
    settings = _make_settings(passes, calibration, cache_dir, cache, opt_level, use_triton)
    compiler_args = {"settings": settings, "dynamic": dynamic, "fullgraph": fullgraph}
    if obj is None:
        return functools.partial(_wrap, compiler_args=compiler_args)
    return _wrap(obj, compiler_args)


def _wrap(obj, compiler_args):
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return _wrap_class(obj, compiler_args)
    if isinstance(obj, nn.Module):
        return CompiledModule(obj, compiler_args)
    if callable(obj):
        compiler = _Compiler(obj, **compiler_args)

        @functools.wraps(obj)
        def compiled(*args, **kwargs):
            return compiler(*args, **kwargs)

        compiled._ec = compiler
        return compiled
    raise TypeError(f"effcompile() needs an nn.Module, an nn.Module class or a callable, got {type(obj).__name__}")


def _wrap_class(cls: type, compiler_args: dict) -> type:
    """Decorating an nn.Module class compiles each instance's forward on its first call."""
    orig_forward = cls.forward

    def forward(self, *args, **kwargs):
        ec = self.__dict__.get("_ec")
        if ec is None:
            ec = _Compiler(functools.partial(orig_forward, self), **compiler_args)
            self.__dict__["_ec"] = ec
        return ec(*args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


def explain(compiled: Any) -> Report:
    """What effcompile did to ``compiled``: passes, kernels, cache outcome, graph breaks, fallbacks.

    Works on what ``effcompile()`` returned and on ``torch.compile(model, backend="effcompile")``
    (after its first call). ``str(report)`` is a readable table.
    """
    ec = getattr(compiled, "_ec", None)
    if isinstance(ec, _Compiler):
        return ec.report
    orig = getattr(compiled, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        # A torch.compile(..., backend="effcompile") module: find its graphs by the parameters they read.
        ids = {id(p) for p in orig.parameters()} | {id(b) for b in orig.buffers()}
        graphs = backend_reports(ids)
        if graphs:
            return Report(graphs=graphs)
        raise ValueError("no effcompile graphs found for this module: call it once before explain()")
    raise TypeError(f"explain() needs an object returned by effcompile() or torch.compile(backend='effcompile'), "
                    f"got {type(compiled).__name__}")
