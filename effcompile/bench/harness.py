"""Run one zoo model x one pass spec: quality against eager, speed against eager and torch.compile, one record."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from effcompile.bench import record, timing
from effcompile.bench import spec as specs
from effcompile.bench.quality import DTYPES, context, eager_reference, measure_quality, move
from effcompile.bench.zoo import ZooModel, get_model

__all__ = ["DTYPES", "Baseline", "BenchSettings", "build_effcompile", "build_inductor", "load_model",
           "measure_baseline", "run", "sweep"]

log = logging.getLogger("effcompile.bench")

SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Everything besides the model and passes that a record depends on (stored in the record)."""

    batch: int = 8
    seq: int | None = None  # None: the model's default (MiniLM pads to the longest text, the LM uses its context)
    device: str = "cpu"
    dtype: str = "float32"
    reps: int = 10
    seed: int = 0
    inductor: bool = True
    decode: bool = True
    decode_batches: tuple[int, ...] = (1, 8)
    decode_steps: int = 32
    decode_warmup: int = 3
    cuda_graphs: bool = True  # decode on CUDA: replay one captured step (no Python launch cost)
    prompt_len: int = 32
    n_queries: int = 128  # embedding quality: retrieval set size
    n_docs: int = 256
    lm_window: int = 128  # causal-LM quality: perplexity windows
    lm_windows: int = 32
    new_tokens: int = 16  # free-running greedy agreement
    calibration_batches: int = 8  # only for passes that need calibration
    cache_dir: str | None = None
    cache: bool = True

    def __post_init__(self):
        for name in ("batch", "reps", "decode_steps", "prompt_len", "n_queries", "n_docs", "lm_window",
                     "lm_windows", "new_tokens", "calibration_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BenchSettings.{name}={v!r}: must be an int >= 1")
        if self.seq is not None and (isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1):
            raise ValueError(f"BenchSettings.seq={self.seq!r}: must be None or an int >= 1")
        if self.decode_warmup < 1:
            raise ValueError(f"BenchSettings.decode_warmup={self.decode_warmup!r}: must be >= 1 (the first step compiles)")
        if self.dtype not in DTYPES:
            raise ValueError(f"BenchSettings.dtype={self.dtype!r}: valid: {', '.join(DTYPES)}")
        dev = torch.device(self.device)  # raises on nonsense like "gpu"
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"BenchSettings.device={self.device!r}: valid: cpu, cuda[:N]")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"BenchSettings.device={self.device!r}: CUDA is not available on this machine")
        batches = tuple(self.decode_batches)
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
            raise ValueError(f"BenchSettings.decode_batches={self.decode_batches!r}: positive ints")
        object.__setattr__(self, "decode_batches", batches)
        if self.n_queries > self.n_docs:
            raise ValueError(f"BenchSettings.n_queries={self.n_queries} must be <= n_docs={self.n_docs}")


# ----------------------------------------------------------------------------- models and inputs
def load_model(model: str | ZooModel, s: BenchSettings) -> ZooModel:
    """A zoo model (by name, or as given) moved to the settings' device and dtype, in eval mode."""
    zm = get_model(model, device=s.device, dtype=DTYPES[s.dtype]) if isinstance(model, str) else model
    zm.model.to(device=s.device, dtype=DTYPES[s.dtype]).eval()
    return zm


def _inputs(zm: ZooModel, batch: int, seq: int | None, seed: int, s: BenchSettings) -> dict:
    seq = None if zm.task == "vision" else seq  # a ViT takes images, not sequences
    x = zm.make_inputs(batch=batch, seq=seq, seed=seed)
    return {k: move(v, s.device, DTYPES[s.dtype]) for k, v in x.items()}


# ----------------------------------------------------------------------------- variants
def build_inductor(model: torch.nn.Module):
    """The torch.compile (inductor, default mode) baseline."""
    return torch.compile(model)


def build_effcompile(model: torch.nn.Module, configs: list, calibration, s: BenchSettings):
    """The optimized variant; no configs means the default exact pipeline (the dense baseline)."""
    import effcompile as ec

    return ec.effcompile(model, passes=list(configs) or None, calibration=calibration,
                         cache_dir=s.cache_dir, cache=s.cache)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


def _attempt(what: str, fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as e:  # a failed variant is recorded as failed, never as a number
        log.warning("bench: %s failed: %s", what, _reason(e))
        return {"failed": _reason(e)}


def _reset_dynamo() -> None:
    # Each variant starts from a clean dynamo: no shared recompile budget, no cached graphs of another backend.
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- speed
def _prefill(fn, inputs: dict, s: BenchSettings) -> dict:
    res = timing.median_ms(lambda: fn(**inputs), s.device, s.reps)
    res["memory"] = timing.peak_memory(lambda: fn(**inputs), s.device)
    return res


def _decode_plan(zm: ZooModel, s: BenchSettings) -> tuple[int, int] | str:
    """(prompt length, timed steps), or why decode is not measured."""
    if zm.task != "causal-lm":
        return f"task {zm.task!r} has no decode"
    if not s.decode:
        return "decode disabled"
    ctx = context(zm.model)
    plen = min(s.prompt_len, ctx // 2)
    steps = min(s.decode_steps, ctx - plen - s.decode_warmup)
    return (plen, steps) if steps >= 1 else f"context {ctx} too short for decode"


def _decode_one(fn, zm: ZooModel, batch: int, s: BenchSettings, weight_adjust: int = 0) -> dict:
    plen, steps = _decode_plan(zm, s)
    prompt = _inputs(zm, batch, plen, s.seed + 2, s)["input_ids"]
    res = timing.decode_speed(fn, zm.model, prompt, steps, s.decode_warmup, s.device, s.cuda_graphs)
    weights = timing.weight_bytes_per_step(zm.model, batch) + weight_adjust
    res.update(prompt_len=plen, weight_bytes_per_step=weights,
               bytes_per_step=weights + res["kv_bytes_per_step"])
    res["gb_per_s"] = res["bytes_per_step"] / (res["ms_per_step"] / 1e3) / 1e9
    return res


def _weight_adjust(graphs) -> int:
    """Bytes a pass saved on weight reads in the graphs that ran (e.g. Quantize's dense -> packed bytes)."""
    delta = 0
    for g in graphs:
        for p in g.passes:
            a = p.artifacts or {}
            if isinstance(a.get("bytes_dense"), int) and isinstance(a.get("bytes_quantized"), int):
                delta += a["bytes_quantized"] - a["bytes_dense"]
    return delta


def _checked(compiled, phase: Callable[[Callable], dict]) -> dict:
    """Run ``phase`` on an effcompile variant; an eager fallback or no compiled graph running is a failure."""
    import effcompile as ec

    rep = ec.explain(compiled)
    n_fallbacks, calls = len(rep.fallbacks), {id(g): g.calls for g in rep.graphs}

    def ran() -> list:
        return [g for g in rep.graphs if g.calls > calls.get(id(g), 0)]

    res = phase(ran)
    if "failed" in res:
        return res
    if rep.fallbacks[n_fallbacks:]:
        return {"failed": "effcompile fell back to eager: " + "; ".join(rep.fallbacks[n_fallbacks:])}
    if not ran():
        return {"failed": "no effcompile graph ran (dynamo ran the call eagerly; recompile limit?)"}
    return res


@dataclasses.dataclass
class Baseline:
    """Eager and torch.compile measurements plus eager's quality reference: once per model, shared by a sweep."""

    zm: ZooModel
    settings: BenchSettings
    inputs: dict
    speed: dict
    reference: Any


def measure_baseline(zm: ZooModel, s: BenchSettings) -> Baseline:
    inputs = _inputs(zm, s.batch, s.seq, s.seed, s)
    plan = _decode_plan(zm, s)
    speed: dict = {"prefill": {}, "decode": {} if isinstance(plan, tuple) else {"skipped": plan}}
    variants: dict[str, Callable[[], Any]] = {"eager": lambda: zm.model}
    if s.inductor:
        variants["inductor"] = lambda: build_inductor(zm.model)
    else:
        speed["prefill"]["inductor"] = {"skipped": "inductor disabled"}
    for name, build in variants.items():
        _reset_dynamo()
        fn = _attempt(f"{name} build", lambda build=build: {"fn": build()})
        if "failed" in fn:
            speed["prefill"][name] = fn
            for b in s.decode_batches if isinstance(plan, tuple) else ():
                speed["decode"].setdefault(f"batch{b}", {})[name] = fn
            continue
        f = fn["fn"]
        speed["prefill"][name] = _attempt(f"{name} prefill", lambda f=f: _prefill(f, inputs, s))
        for b in s.decode_batches if isinstance(plan, tuple) else ():
            speed["decode"].setdefault(f"batch{b}", {})[name] = _attempt(
                f"{name} decode batch {b}", lambda f=f, b=b: _decode_one(f, zm, b, s))
    if not s.inductor:
        for b in s.decode_batches if isinstance(plan, tuple) else ():
            speed["decode"][f"batch{b}"]["inductor"] = {"skipped": "inductor disabled"}
    _reset_dynamo()
    reference = eager_reference(zm, s, lambda: _inputs(zm, s.batch, s.seq, s.seed + 1, s))
    return Baseline(zm, s, inputs, speed, reference)


def _measure_peer(zm: ZooModel, configs: list, speed: dict, s: BenchSettings, baseline: Baseline, plan) -> None:
    """TorchAO's version of the same quantization, timed like the others (speed only), when there is one."""
    from effcompile.bench import peers

    _reset_dynamo()
    built = _attempt("torchao build", lambda: dict(zip(("fn", "why"), peers.build_torchao(zm.model, configs),
                                                       strict=True)))
    if built.get("fn") is None:
        entry = built if "failed" in built else {"skipped": built["why"]}
        speed["prefill"]["torchao"] = entry
        for b in s.decode_batches if isinstance(plan, tuple) else ():
            speed["decode"][f"batch{b}"]["torchao"] = entry
        return
    fn = built["fn"]
    speed["prefill"]["torchao"] = _attempt("torchao prefill", lambda: _prefill(fn, baseline.inputs, s))
    for b in s.decode_batches if isinstance(plan, tuple) else ():
        speed["decode"][f"batch{b}"]["torchao"] = _attempt(f"torchao decode batch {b}",
                                                           lambda b=b: _decode_one(fn, zm, b, s))
    _reset_dynamo()


# ----------------------------------------------------------------------------- records
def _resolve(passes: str | tuple[str, list] | Sequence | None) -> tuple[str, list]:
    if passes is None or isinstance(passes, str):
        return specs.parse_passes(passes)
    if isinstance(passes, tuple) and len(passes) == 2 and isinstance(passes[0], str):
        return passes[0], list(passes[1])
    configs = list(passes)
    return "+".join(specs.snake_case(type(c).__name__) for c in configs) or "none", configs


def run(model: str | ZooModel, passes: str | tuple[str, list] | Sequence | None = "none",
        settings: BenchSettings | None = None, *, baseline: Baseline | None = None) -> dict:
    """Benchmark one model with one pass spec (a spec string, ``(label, configs)`` or a config list).

    The record (JSON-able) holds: model, task, passes {spec, configs}, device, versions, seed, date,
    settings, inputs; ``quality`` {metric, higher_is_better, base (eager), optimized, recovery, details};
    ``speed`` {prefill: {eager, inductor, effcompile}: median/min ms + peak memory; decode: {batchN:
    {variant: ms/step, tokens/s, bytes read per step, GB/s}}}; ``ratios`` (speedups vs eager and vs
    torch.compile) and an ``effcompile`` explain() summary. Anything that failed is ``{"failed": reason}``
    and anything not measured ``{"skipped": reason}``: never a number. ``baseline`` (from
    :func:`measure_baseline`) reuses eager/inductor measurements of the same run, as a sweep does.
    """
    s = settings or BenchSettings()
    label, configs = _resolve(passes)  # spec errors surface before any model is loaded
    t0 = time.perf_counter()
    if baseline is None:
        baseline = measure_baseline(load_model(model, s), s)
    zm = baseline.zm
    speed = {"prefill": dict(baseline.speed["prefill"]),
             "decode": {k: dict(v) if isinstance(v, dict) else v for k, v in baseline.speed["decode"].items()}}
    needs_calib = any(getattr(c, "needs_calibration", False) for c in configs)
    calibration = ([_inputs(zm, s.batch, s.seq, s.seed + 1000 + i, s) for i in range(s.calibration_batches)]
                   if needs_calib else None)
    _reset_dynamo()
    built = _attempt("effcompile build", lambda: {"fn": build_effcompile(zm.model, configs, calibration, s)})
    plan = _decode_plan(zm, s)
    if "failed" in built:
        speed["prefill"]["effcompile"] = quality = built
        for d in speed["decode"].values():
            if isinstance(d, dict) and "skipped" not in d:
                d["effcompile"] = built
        summary = None
    else:
        fn = built["fn"]
        speed["prefill"]["effcompile"] = _attempt("effcompile prefill", lambda: _checked(
            fn, lambda ran: _prefill(fn, baseline.inputs, s)))
        for b in s.decode_batches if isinstance(plan, tuple) else ():
            def decode(ran, b=b):
                res = _decode_one(fn, zm, b, s)  # weights as dense; corrected below from what the graphs did
                adjust = _weight_adjust(ran())
                res["weight_bytes_per_step"] += adjust
                res["bytes_per_step"] += adjust
                res["gb_per_s"] = res["bytes_per_step"] / (res["ms_per_step"] / 1e3) / 1e9
                return res
            speed["decode"][f"batch{b}"]["effcompile"] = _attempt(
                f"effcompile decode batch {b}", lambda decode=decode: _checked(fn, decode))
        _measure_peer(zm, configs, speed, s, baseline, plan)
        from effcompile.compiler.sparse_ops import measure_sparsity

        # Activation sparsity achieved per layer, counted over the quality run's inputs (nothing is
        # counted when no pass inserted sparsify ops): the record shows it next to the target.
        with measure_sparsity() as achieved:
            quality = _attempt("effcompile quality", lambda: _checked(
                fn, lambda ran: measure_quality(
                zm, fn, baseline.reference, s, lambda: _inputs(zm, s.batch, s.seq, s.seed + 1, s))))
        summary = _attempt("explain", lambda: record.explain_summary(fn))
        if achieved and isinstance(summary, dict) and "failed" not in summary:
            summary["sparsity_achieved"] = {"mean": sum(achieved.values()) / len(achieved),
                                            "layers": {k: round(v, 4) for k, v in achieved.items()}}
    _reset_dynamo()
    methods = {e["memory"]["method"] for e in speed["prefill"].values() if isinstance(e, dict) and "memory" in e}
    speed["memory_method"] = {m: timing.MEMORY_METHODS[m] for m in sorted(methods)}
    settings_json = {k: record.jsonable(v) for k, v in dataclasses.asdict(s).items() if k != "cache_dir"}
    return {
        "schema": SCHEMA,
        "model": zm.name,
        "task": zm.task,
        "passes": {"spec": label, "configs": [record.config_json(c) for c in configs]},
        "device": s.device,
        "device_name": record.device_name(s.device),
        "dtype": s.dtype,
        "cpu_threads": torch.get_num_threads(),
        # Shared machines: the load average says how much other work competed with the timings.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": record.versions(),
        "seed": s.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings_json,
        "inputs": {k: list(v.shape) for k, v in baseline.inputs.items() if isinstance(v, torch.Tensor)},
        "calibration": {"batches": s.calibration_batches, "seeds_from": s.seed + 1000} if needs_calib else None,
        "quality": quality,
        "speed": speed,
        "ratios": record.ratios(speed),
        "effcompile": summary,
        "seconds": time.perf_counter() - t0,
    }


def sweep(model: str | ZooModel, sweep_spec: str, settings: BenchSettings | None = None, *,
          include_dense: bool = True, progress: bool = True,
          on_record: Callable[[dict], None] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Run every valid grid point of ``sweep_spec`` (plus the dense baseline) against one shared baseline.

    Returns ``(records, invalid)`` where ``invalid`` lists ``(spec, why)`` for combinations a config
    rejected; those are not runs and produce no record.
    """
    from tqdm.auto import tqdm

    s = settings or BenchSettings()
    points, invalid = specs.expand_sweep(sweep_spec)
    if not points:
        raise specs.SpecError("no valid grid point in the sweep:\n  " + "\n  ".join(f"{p}: {w}" for p, w in invalid))
    for p, why in invalid:
        log.warning("sweep: skipping %s (%s)", p, why)
    if include_dense:
        points = [("none", []), *points]
    zm = load_model(model, s)
    bar = tqdm(total=len(points) + 1, desc=f"bench {zm.name}", disable=not progress, unit="run")
    bar.set_postfix_str("eager + torch.compile baseline")
    base = measure_baseline(zm, s)
    bar.update()
    records = []
    for label, configs in points:
        bar.set_postfix_str(label)
        rec = run(zm, (label, configs), s, baseline=base)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        bar.update()
    bar.close()
    return records, invalid
