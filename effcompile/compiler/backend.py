"""The dynamo backend: one captured graph -> IR -> passes -> Triton codegen -> cached, guarded callable.

``torch.compile(model, backend="effcompile", options={...})`` reaches :func:`effcompile_backend`
through the ``torch_dynamo_backends`` entry point; ``effcompile(model)`` uses the same machinery with
its own settings. Each graph dynamo hands us becomes a :class:`CompiledGraph`:

* its cache key is computed before any pass runs, so a warm start (memory or disk) skips passes,
  calibration and codegen, and only redoes dynamo's capture;
* dims that dynamo made symbolic are bucketed (powers of two); a call whose sizes stay inside the
  bucket runs the compiled variant, a new bucket compiles one more variant (and says so in explain()).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from effcompile import config
from effcompile.codegen import ops as _ops
from effcompile.compiler import ir, weights
from effcompile.compiler.pass_manager import PassContext, PassManager, lookup
from effcompile.runtime.report import GraphReport

log = logging.getLogger("effcompile")

BACKEND_OPTIONS = {
    "passes": "list of pass configs (default: the exact pipeline)",
    "opt_level": "0 = no rewrites or kernels, 1 = default",
    "cache_dir": "directory of the compiled-graph cache (default: per-user cache dir)",
    "cache": "False turns the on-disk cache off",
    "use_triton": "None = Triton where it can run, False = always the torch path",
}


@dataclass
class Settings:
    """Validated compile settings shared by the call form and the backend form."""

    passes: tuple = ()
    opt_level: int = 1
    cache_dir: str | None = None
    cache: bool = True
    use_triton: bool | None = None
    calibration: Any = None

    @classmethod
    def from_options(cls, options: dict | None) -> Settings:
        options = dict(options or {})
        unknown = sorted(set(options) - set(BACKEND_OPTIONS))
        if "calibration" in unknown:
            raise ValueError(
                "options['calibration'] is not supported by the torch.compile backend (it cannot run the "
                "model on your batches); use effcompile.effcompile(model, calibration=...) instead"
            )
        if unknown:
            valid = ", ".join(f"{k} ({v})" for k, v in BACKEND_OPTIONS.items())
            raise ValueError(f"unknown effcompile option(s) {unknown}; valid options: {valid}")
        return cls.make(**options)

    @classmethod
    def make(cls, passes=None, opt_level=1, cache_dir=None, cache=True, use_triton=None, calibration=None):
        from effcompile.compiler.pipeline import default_passes

        if passes is None:
            passes = default_passes()
        if not isinstance(passes, list | tuple):
            raise TypeError(f"passes must be a list of pass configs, got {type(passes).__name__}")
        for p in passes:
            lookup(p)  # raises a clear error for unregistered configs or classes passed by mistake
        if opt_level not in (0, 1, 2):
            raise ValueError(f"opt_level must be 0, 1 or 2, got {opt_level!r}")
        if use_triton not in (None, True, False):
            raise ValueError(f"use_triton must be None, True or False, got {use_triton!r}")
        return cls(tuple(passes), opt_level, None if cache_dir is None else str(cache_dir), bool(cache),
                   use_triton, calibration)


def effcompile_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode=None, options=None):
    """``torch.compile(model, backend="effcompile", options={...})``. Returns a callable like gm.forward."""
    settings = Settings.from_options(options)
    compiled = CompiledGraph(gm, example_inputs, settings, shared=weights.backend_shared(_params(gm, example_inputs)))
    _BACKEND_GRAPHS.append(weakref.ref(compiled))
    return compiled


# explain() finds a torch.compile'd model's graphs here (bounded: a long-lived process compiles a lot). Weakly: a
# graph dynamo dropped (torch._dynamo.reset()) is not listed, nor is a freed model's whose parameter ids came back.
_BACKEND_GRAPHS: deque[weakref.ref] = deque(maxlen=4096)


def backend_reports(param_ids: set[int]) -> list[GraphReport]:
    """The reports of the live backend-form graphs that read any of these parameters, in compile order."""
    return [g.report for r in _BACKEND_GRAPHS if (g := r()) is not None and g.report.param_ids & param_ids]


_STORES: dict[str, Any] = {}  # one store per cache root, so its in-memory layer is shared


def _store(settings: Settings):
    if not settings.cache or not config.cache_enabled() or settings.opt_level == 0:
        return None
    from effcompile.runtime.cache import CacheStore

    store = CacheStore(settings.cache_dir)
    store = _STORES.setdefault(str(store.root), store)
    store.entry_path("0" * 64)  # checks the directory is private now (CacheDirError if not)
    return store


def _dynamic_dims(gm: fx.GraphModule) -> list[tuple[int, int]]:
    """(input index, dim) pairs that dynamo traced as symbolic."""
    dims = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = ir.node_val(node)
        if isinstance(val, torch.Tensor):
            dims.extend((i, d) for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt))
    return dims


def _symbol_bounds(gm: fx.GraphModule, dynamic: list[tuple[int, int]], sig: tuple | None) -> dict:
    """{sympy symbol: the largest size it takes} for the symbolic input dims of shape bucket ``sig`` (one "lo-hi"
    string per ``dynamic`` entry): a variant compiled for a bucket only ever runs inputs inside it."""
    if not sig:
        return {}
    vals = [ir.node_val(n) for n in gm.graph.nodes if n.op == "placeholder"]
    bounds = {}
    for (i, d), b in zip(dynamic, sig, strict=True):
        size = vals[i].shape[d]
        expr = getattr(getattr(size, "node", None), "expr", None)
        if expr is not None and getattr(expr, "is_Symbol", False):
            bounds[expr] = max(bounds.get(expr, 0), int(str(b).split("-")[-1]))
    return bounds


def _source_name(node: fx.Node) -> str:
    """Dynamo's name of what a placeholder reads (L['self']._modules['fc']._parameters['weight']), else the node's."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", node.name)
    return name() if callable(name) else name  # a method before torch 2.13, a property since


def _params(gm: fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """Placeholder name -> real parameter/buffer tensor, for passes that transform weights."""
    out = {}
    for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs, strict=False):
        name = _source_name(node)
        if isinstance(value, torch.nn.Parameter) or "_parameters" in name or "_buffers" in name:
            out[node.name] = value
    return out


class CompiledGraph:
    """A compiled dynamo graph: guarded by shape bucket, one compiled variant per bucket."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
                 calibration_inputs: list | None = None, index: int = 0, model_calibration: dict | None = None,
                 shared: dict | None = None):
        # model_calibration: every graph's recorded calibration inputs, for a graph that got none of its
        # own (a decode step): its calibrated passes reuse what the others fitted, so that data is in its key.
        self.model_calibration = model_calibration
        self.shared = {} if shared is None else shared  # PassContext.shared: the compiled model's, or this graph's
        self.settings = settings
        self.pristine = gm
        self.example_inputs = list(example_inputs)
        ir.annotate(gm, example_inputs)
        self.dynamic = _dynamic_dims(gm)
        self.calibration_inputs = calibration_inputs
        params = _params(gm, example_inputs)
        self.report = GraphReport(
            index=index, fingerprint=ir.fingerprint(gm), nodes=len(gm.graph.nodes),
            sublayers=ir.tag_sublayers(gm),
            param_ids=frozenset(id(p) for p in params.values()),
        )
        self.params = params
        self.variants: dict[tuple, Any] = {}
        # The weights a pass reads are checked on every call; other weights get variants of their own (weights.py).
        reads = any(getattr(c, "needs_calibration", False) or getattr(c, "reads_weights", False) for c in settings.passes)
        ids = {id(p) for p in params.values()}
        slots = [i for i, x in enumerate(self.example_inputs)
                 if reads and isinstance(x, torch.nn.Parameter) and id(x) in ids]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # Named as the model names them (model.layers.0.mlp.up_proj.weight), for explain().
        names = [ir.normalize_path(_source_name(placeholders[i]).replace("._parameters", ""))
                 if i < len(placeholders) else f"input {i}" for i in slots]
        self.weights = weights.WeightSets(slots, names, self.example_inputs)
        self._warned_grad = False
        self._lock = threading.Lock()  # threads entering a new bucket together compile it once
        self._compile_variant(self._bucket_of(example_inputs))

    def _bucket_of(self, args) -> tuple:
        from effcompile.runtime.key import bucket

        return tuple(bucket(int(args[i].shape[d])) for i, d in self.dynamic)

    def _use_weights(self, args, new: tuple) -> None:
        """Switch to the variants compiled for the parameters in ``args``, compiling one if there are none."""
        state = (self.params, self.variants, self.example_inputs, self.calibration_inputs)
        why, kept = self.weights.switch(self.example_inputs, args, new, state)
        if kept is not None:
            self.params, self.variants, self.example_inputs, self.calibration_inputs = kept
            return
        swap = self.weights.swap(self.example_inputs, args)
        self.params = {k: swap.get(id(v), v) for k, v in self.params.items()}
        self.example_inputs = [swap.get(id(x), x) for x in self.example_inputs]
        if self.calibration_inputs:
            self.calibration_inputs = [[swap.get(id(x), x) for x in batch] for batch in self.calibration_inputs]
        self.report.param_ids = self.report.param_ids | {id(p) for p in swap.values()}
        self.variants = {}
        msg = f"parameters changed ({why}): recompiled for the new weights"
        log.info("effcompile graph %s: %s", self.report.fingerprint[:12], msg)
        self.report.recompiles.append(msg)
        self._compile_variant(self._bucket_of(args))

    def __call__(self, *args):
        sig = self._bucket_of(args) if self.dynamic else None
        with self._lock:  # held for the compile of a new bucket only; otherwise a dict lookup
            self.report.calls += 1
            if (new := self.weights.changed(args)) is not None:
                self._use_weights(args, new)
            if self.dynamic:
                run = self.variants.get(sig)
                if run is None:
                    self.report.recompiles.append(f"new shape bucket {sig} (have {list(self.variants)})")
                    run = self._compile_variant(sig)
            else:
                run = next(iter(self.variants.values()), None)
                if run is None:  # compiling for new weights failed last call (a calibrated pass without its fits)
                    run = self._compile_variant(())
        if not self._warned_grad and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            # An inference compiler: generated kernels have no backward. Say so once, loudly.
            self._warned_grad = True
            msg = ("inputs require grad but effcompile compiles for inference: outputs will not require "
                   "grad (wrap calls in torch.no_grad() to silence this)")
            self.report.fallbacks.append(("autograd", msg))
            warnings.warn(f"effcompile: {msg}", RuntimeWarning, stacklevel=2)
        with torch.no_grad():
            return run(*args)

    # -- compile one variant ---------------------------------------------------------------------

    def _key(self, sig: tuple):
        from effcompile.runtime import key as K

        dyn = {}
        for (i, d) in self.dynamic:
            dyn.setdefault(i, []).append(d)
        specs = [K.input_spec(x, dynamic_dims=dyn.get(i, ())) for i, x in enumerate(self.example_inputs)]
        passes = []
        for cfg in self.settings.passes:
            entry = lookup(cfg)
            passes.append(K.pass_identity(entry.name, type(cfg).version, entry.fn, cfg))
        device = next((x.device for x in self.example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        data = {}
        if any(getattr(c, "needs_calibration", False) or getattr(c, "reads_weights", False)
               for c in self.settings.passes):
            # Calibrated decisions depend on the data and on the weights: both belong in the key,
            # or a fine-tuned model would silently reuse the old thresholds.
            param_ids = {id(p) for p in self.params.values()}
            calib = {f"{b}.{i}": x for b, args in enumerate(self.calibration_inputs or [])
                     for i, x in enumerate(args) if isinstance(x, torch.Tensor) and id(x) not in param_ids}
            # The weights' digests are kept for the compiled model's other graphs (they key the same weights).
            digests = self.shared.setdefault("key.digests", K.TensorMemo())
            data = {"calibration": K.calibration_hash(calib), "weights": K.calibration_hash(self.params, digests)}
            if not self.calibration_inputs and self.model_calibration:
                # No data of its own: thresholds / smoothing scales / EoRA factors are reused from the
                # graphs that had some (passes/calibration.py calibrated_for), so a cached entry built
                # from other calibration data must not match.
                data["model_calibration"] = K.calibration_hash(
                    {f"{sig}.{j}.{name}": t for sig, recs in self.model_calibration.items()
                     for j, rec in enumerate(recs) for name, t in rec.items() if id(t) not in param_ids})
        return K.make_key(**data,
            graph=self.report.fingerprint, inputs=specs, buckets=[str(s) for s in sig], passes=passes,
            opt_level=self.settings.opt_level, use_triton=str(self.settings.use_triton),
            # Lowering reads it (CPU bags and unfused row ops without Triton; Triton kernels with it).
            triton_interpret=_ops.env_interpret(),
            versions=K.versions(), device=K.device_capability(device),
        )

    def _compile_variant(self, sig: tuple):
        from effcompile.runtime.cache import CacheDirError

        start = time.perf_counter()
        try:
            store = _store(self.settings)
        except CacheDirError as e:
            # Refuse the unsafe directory, but keep compiling: in memory only, and say so.
            warnings.warn(f"effcompile: disk cache disabled: {e}", RuntimeWarning, stacklevel=2)
            self.report.cache_note = f"disk cache disabled: {e}"
            store = None
        from effcompile.runtime.key import UnkeyableValue

        try:
            key = self._key(sig)
            self.report.key_digest, self.report.key_fields = key.digest, key.fields
        except UnkeyableValue as e:  # e.g. a pass defined in a REPL: no source to hash, so no caching
            log.info("effcompile: graph %s not cached: %s", self.report.fingerprint[:12], e)
            store, key = None, None
            self.report.cache_note = f"not cacheable: {e}"
        self.report.buckets.append(str(sig) if sig else "static")
        run = self._load(store, key) if store is not None else None
        if run is None:
            run = self._build(store, key, _symbol_bounds(self.pristine, self.dynamic, sig))
        self.report.compile_seconds += time.perf_counter() - start
        self.variants[sig] = run
        if isinstance(getattr(run, "__self__", None), fx.GraphModule):
            # Weakly: reports outlive graphs (the backend keeps the last 4096), modules must not.
            self.report.modules.append(weakref.ref(run.__self__))  # live buffers, e.g. thresholds
        return run

    def _load(self, store, key):
        from effcompile.codegen.lower import load_kernels
        from effcompile.runtime.serialize import graph_from_json

        memory_hits = store.stats.memory_hits
        # A blob another of this model's graphs already loaded is taken from it, not read and hashed again.
        entry = store.get(key, reuse=lambda sha: ir.loaded_tensor(self.shared, sha))
        if entry is None:
            return None
        try:
            from effcompile.codegen.lower_cpu import cached_kernels_unusable

            if why := cached_kernels_unusable(k.get("kind") for k in entry.meta["kernels"]):
                raise RuntimeError(why)
            kernel_dir = Path(store.root) / "kernels"
            paths = _write_sources(kernel_dir, {n: s for n, s in entry.sources.items() if n.endswith(".py")})
            load_kernels(paths)
            # One copy of a packed weight for all of this model's graphs, as a cold compile makes (ir.shared_tensors);
            # in place, so the store's in-memory layer keeps the shared one too.
            ir.share_loaded_tensors(self.shared, entry.tensors, entry.digests)
            # And one device copy of each (safetensors loads to the CPU; each graph moved its own).
            devices = {n: a.get("device", "cpu") for n, a in entry.meta["graph"].get("attrs", {}).items()}
            tensors = ir.place_loaded_tensors(self.shared, entry.tensors, entry.digests, devices)
            gm = graph_from_json(entry.meta["graph"], tensors)
        except Exception as e:  # a bad entry is a miss, never a crash
            log.warning("effcompile cache entry %s unusable (%s); recompiling", key.digest[:16], e)
            self.report.cache_note = f"entry unusable: {e}"
            return None
        if entry.meta.get("fits"):
            from effcompile.passes.calibration import import_fits

            import_fits(entry.meta["fits"], entry.tensors, self.params)
        self.report.cache = "memory hit" if store.stats.memory_hits > memory_hits else "disk hit"
        self.report.passes = [_record_from_json(p) for p in entry.meta["passes"]]
        self.report.kernels = [_kernel_from_json(k, kernel_dir) for k in entry.meta["kernels"]]
        self.report.fallbacks = [tuple(f) for f in entry.meta["fallbacks"]]
        return gm.forward

    def _build(self, store, key, bounds: dict | None = None):
        from effcompile.codegen.lower import lower

        gm = ir.copy_graph_module(self.pristine)
        ir.annotate(gm, self.example_inputs)
        ctx = PassContext(self.example_inputs, self.calibration_inputs, self.params, self.settings.opt_level,
                          shared=self.shared)
        if self.settings.opt_level == 0:
            self.report.cache = "off"
            return gm.forward
        self.report.passes = PassManager(self.settings.passes, opt_level=self.settings.opt_level).run(gm, ctx)
        kernel_dir = Path(store.root) / "kernels" if store is not None else Path(tempfile.mkdtemp(prefix="effcompile-"))
        backup = ir.copy_graph_module(gm)
        try:
            lowered = lower(gm, kernel_dir, use_triton=self.settings.use_triton, symbol_bounds=bounds, shared=self.shared)
        except Exception as e:  # never a crash: the rewritten graph still runs through torch
            reason = f"codegen failed ({type(e).__name__}: {e}); the graph runs through torch ops"
            log.warning("effcompile: FALLBACK for graph %s: %s", self.report.fingerprint[:12], reason)
            self.report.fallbacks = [("whole graph", reason)]
            self.report.cache = "off"
            return backup.forward
        self.report.kernels, self.report.fallbacks = list(lowered.kernels), list(lowered.fallbacks)
        if config.debug_level() >= 3:
            for k in lowered.kernels:
                log.info("kernel %s (%s): %s <- %s", k.name, k.kind, "+".join(k.ops), ", ".join(k.sublayers))
        if config.debug_level() >= 4:
            for k in lowered.kernels:
                log.info("source of %s:\n%s", k.name, Path(k.source_path).read_text())
        if store is None:
            self.report.cache = "off"
        else:
            self.report.cache = "miss"
            self._save(store, key, gm)
        return gm.forward

    def _save(self, store, key, gm):
        from effcompile.runtime.cache import CacheEntry
        from effcompile.runtime.serialize import NotSerializable, graph_to_json

        try:
            graph, tensors = graph_to_json(gm)
        except NotSerializable as e:
            self.report.cache, self.report.cache_note = "not cacheable", str(e)
            log.info("effcompile: graph %s not cached: %s", self.report.fingerprint[:12], e)
            return
        sources = {Path(k.source_path).name: Path(k.source_path).read_text() for k in self.report.kernels}
        meta = {
            "graph": graph,
            "passes": [_record_to_json(p) for p in self.report.passes],
            "kernels": [_kernel_to_json(k) for k in self.report.kernels],
            "fallbacks": [list(f) for f in self.report.fallbacks],
        }
        if self.calibration_inputs:
            # The fits calibrated passes made here (thresholds, smoothing scales, EoRA factors): a process
            # that loads this entry gets them back, so a decode graph it compiles can still reuse them.
            from effcompile.passes.calibration import export_fits

            records, fit_tensors = export_fits(self.params)
            meta["fits"] = _json_safe(records)
            tensors = {**tensors, **{k: v for k, v in fit_tensors.items() if k not in tensors}}
        store.put(key, CacheEntry(meta=meta, sources=sources, tensors=tensors))


def _write_sources(kernel_dir: Path, sources: dict[str, str]) -> list[Path]:
    kernel_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for name, text in sources.items():
        path = kernel_dir / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".tmp{id(text)}")
            tmp.write_text(text)
            tmp.replace(path)
        paths.append(path)
    return paths


def _record_to_json(p) -> dict:
    return {"name": p.name, "phase": p.phase, "config": repr(p.config), "ran": p.ran, "modified": p.modified,
            "count": p.count, "where": list(p.where), "seconds": p.seconds, "note": p.note,
            "artifacts": _json_safe(p.artifacts)}


def _json_safe(v):
    """Artifacts as strict JSON (the cache rejects NaN/inf): so a warm start's explain() still shows them."""
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return repr(v)
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return repr(v)


def _record_from_json(d: dict):
    from effcompile.compiler.pass_manager import PassRecord

    return PassRecord(d["name"], d["phase"], d["config"], d["ran"], d["modified"], d["count"], d["where"],
                      d["seconds"], d["note"], d.get("artifacts", {}))


def _kernel_to_json(k) -> dict:
    return {"name": k.name, "op": k.op, "source": Path(k.source_path).name, "kind": k.kind, "ops": list(k.ops),
            "nodes": list(k.nodes), "sublayers": list(k.sublayers)}


def _kernel_from_json(d: dict, kernel_dir: Path):
    from effcompile.codegen.lower import KernelRecord

    return KernelRecord(name=d["name"], op=d["op"], source_path=str(kernel_dir / d["source"]), kind=d["kind"],
                        ops=tuple(d["ops"]), nodes=tuple(d["nodes"]), sublayers=tuple(d["sublayers"]))
