"""Speed measurement for the harness: median latency, peak memory, static-KV-cache decode and bytes per token."""

from __future__ import annotations

import copy
import ctypes
import inspect
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["MEMORY_METHODS", "decode_speed", "kv_cache_bytes", "median_ms", "peak_memory", "sync",
           "weight_bytes_per_step"]

MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated over one steady-state call (bytes, absolute: includes the weights); "
            "delta_bytes is that peak minus what was allocated before the call",
    "cpu": "peak RSS over one steady-state call: malloc_trim, VmHWM reset through /proc/self/clear_refs, then "
           "VmHWM after minus VmRSS before (bytes; weights already resident are not counted)",
    "cpu-maxrss": "ru_maxrss growth over one steady-state call (a lower bound: the process high-water mark "
                  "could not be reset)",
}


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 2) -> dict:
    """First call (compile included) in seconds, then the median and min of ``reps`` steady-state calls."""
    if reps < 1:
        raise ValueError(f"reps={reps} must be >= 1")
    with torch.no_grad():
        t = time.perf_counter()
        fn()
        sync(device)
        first = time.perf_counter() - t
        for _ in range(warmup):
            fn()
        sync(device)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps, "first_call_s": first}


# ----------------------------------------------------------------------------- memory
def _proc_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    # Hand freed heap pages back to the OS first: otherwise a call that reuses memory an earlier variant
    # freed shows no RSS growth at all (glibc keeps freed blocks mapped).
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    # Writing 5 to clear_refs resets this process's VmHWM (Linux >= 4.0), so the peak of one call is
    # measurable; ru_maxrss cannot be reset and only shows growth above the lifetime high-water mark.
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_kib("VmHWM") is not None


def peak_memory(fn: Callable[[], object], device: str) -> dict:
    """Peak memory of one call of ``fn`` (after warm-up); ``method`` names a key of MEMORY_METHODS."""
    with torch.no_grad():
        if torch.device(device).type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync(device)
            peak = torch.cuda.max_memory_allocated()
            return {"method": "cuda", "peak_bytes": peak, "delta_bytes": peak - before}
        if _reset_hwm():
            before = _proc_kib("VmRSS")
            fn()
            return {"method": "cpu", "delta_bytes": max(0, (_proc_kib("VmHWM") - before)) * 1024}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return {"method": "cpu-maxrss",
                "delta_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}


# ----------------------------------------------------------------------------- decode
def cache_kwarg(model) -> str:
    """The forward keyword that takes a KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def kv_cache_bytes(cache) -> int:
    """Bytes of a static cache's key and value buffers (all of it: HF attends over the full static length)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Parameter + buffer bytes one decode step reads: every weight once, but an embedding table only the
    ``batch`` rows it gathers (unless it is also the output head, which reads all of it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_id = id(head.weight) if head is not None else None
    gathered = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - {head_id}
    total, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in gathered:
            total += batch * t.shape[-1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def graphed_steps(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Capture one decode step in a CUDA graph (after warm-up on a side stream, as torch's docs do) and
    time ``steps`` replays one by one with CUDA events (ms each)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def summarize_kernels(events, top: int = 12) -> dict:
    """GPU work of profiled events (kernels, memsets, copies): how many, their summed time, the largest."""
    by_name: dict[str, list] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        agg = by_name.setdefault(e.name, [0, 0.0])
        agg[0] += 1
        agg[1] += e.time_range.elapsed_us()
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"gpu_kernels": sum(c for c, _ in by_name.values()),
            "gpu_busy_ms": round(sum(us for _, us in by_name.values()) / 1e3, 4),
            "top": [{"name": name[:120], "count": c, "us": round(us, 1)} for name, (c, us) in rows[:top]]}


def kernel_profile(step: Callable[[], None]) -> dict:
    """One plain (not graphed) step under the torch profiler: its GPU kernels by name. Set beside a graphed
    step time, busy time against step time says how much of a step is launch gaps, not kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return summarize_kernels(prof.events())


@torch.no_grad()
def decode_speed(fn, model, prompt_ids: torch.Tensor, steps: int, warmup: int, device: str,
                 cuda_graph: bool = False, profile: bool = False, cache_len: int | None = None) -> dict:
    """Greedy decode ``steps`` tokens one at a time through ``fn`` with an HF StaticCache.

    The cache holds the prompt and the steps, or ``cache_len`` positions if that is more: serving stacks
    allocate a static cache for the longest sequence, and attention may read all of it every step.

    The prompt is prefilled by the eager ``model`` (prefill is measured separately); each timed step is
    ``fn(input_ids=[B,1], cache=StaticCache, cache_position=[1])`` + argmax, with the token and position
    in static tensors updated in place. With ``cuda_graph`` (CUDA only) one step is captured in a CUDA
    graph and replayed, as serving stacks do, so the numbers show the GPU work rather than Python's
    launch cost; if capture fails the reason is recorded and the plain loop is timed. Returns the median
    step time, tokens/s (batch tokens per step) and the KV-cache bytes the attention reads per step; with
    ``profile`` (CUDA only), also one more step's GPU kernels (kernel_profile) under "profile". The first
    step (the one that compiles) is checked: its logits against the eager ``model``'s at the same position and
    cache, under "logits_vs_eager" (a kernel wrong at decode shapes shows here, where the timing cannot).
    """
    from transformers import StaticCache

    from effcompile.bench.metrics import logit_agreement

    batch, plen = prompt_ids.shape
    total = plen + 2 * warmup + steps + 3  # checked, warm-up, capture, timed and profiled steps write the cache
    cache = StaticCache(config=model.config, max_cache_len=max(total, cache_len or 0))
    kw = cache_kwarg(model)
    out = model(input_ids=prompt_ids, **{kw: cache}, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    # An explicit position: without one HF derives it from the cache contents, which syncs the GPU.
    pos = torch.tensor([plen], device=prompt_ids.device)
    extra = {"cache_position": pos} if "cache_position" in inspect.signature(model.forward).parameters else {}

    def step():
        nxt = fn(input_ids=tok, **{kw: cache}, use_cache=True, **extra).logits[:, -1:].argmax(-1)
        tok.copy_(nxt)
        pos.add_(1)

    # Eager steps on a copy of the cache: a cache may count its own length, so a second call on the same
    # cache would be the next position.
    ref = model(input_ids=tok, **{kw: copy.deepcopy(cache)}, use_cache=True, **extra).logits[:, -1]
    t = time.perf_counter()
    logits = fn(input_ids=tok, **{kw: cache}, use_cache=True, **extra).logits[:, -1]  # compiles
    sync(device)
    first = time.perf_counter() - t
    check = logit_agreement(ref, logits)
    tok.copy_(logits.argmax(-1, keepdim=True))
    pos.add_(1)
    graphed: bool | str = False
    times: list[float] = []
    if cuda_graph and torch.device(device).type == "cuda":
        try:
            times = graphed_steps(step, warmup, steps)
            graphed = True
        except Exception as e:  # noqa: BLE001 - recorded, and the plain loop below measures instead
            graphed = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
    if not times:
        for i in range(warmup + steps):
            t = time.perf_counter()
            step()
            sync(device)
            dt = time.perf_counter() - t
            if i >= warmup:
                times.append(dt * 1e3)
    ms = statistics.median(times)
    res = {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms, "steps": steps, "first_step_s": first,
           "kv_bytes_per_step": kv_cache_bytes(cache), "max_cache_len": max(total, cache_len or 0),
           "cuda_graph": graphed,
           "logits_vs_eager": {k: round(v, 5) for k, v in check.items()}}
    if profile and torch.device(device).type == "cuda":
        try:
            res["profile"] = kernel_profile(step)
        except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the timing
            res["profile"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return res
