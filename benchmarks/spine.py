"""Spine benchmark: eager vs torch.compile (inductor) vs effcompile, same run, same inputs.

Measures, per model: steady-state latency (median of N calls) and ratios against eager; the cold
compile (fresh process, empty cache) against the warm start (fresh process, cache on disk); and the
per-call dispatch overhead of a compiled wrapper on a tiny model. Writes
benchmarks/results/spine-<device>-<date>.json.

    python benchmarks/spine.py                    # MiniLM 8x128 + a Llama-style stack, on cuda if present
    python benchmarks/spine.py --models minilm --reps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "llama")


def build(name: str, device: str):
    """(model, inputs, output getter) for a benchmark model."""
    from effcompile.testing import load_minilm, tiny_hf

    if name == "minilm":
        model, tok = load_minilm()
        text = "The compiler captures the model, rewrites its graph and generates fused kernels. " * 12
        inputs = dict(tok([text] * 8, truncation=True, max_length=128, padding="max_length", return_tensors="pt"))
        get = lambda o: o.last_hidden_state  # noqa: E731
    elif name == "llama":
        # A Llama-style stack: RoPE, SwiGLU, RMSNorm, GQA; random weights (speed only).
        model = tiny_hf("llama", layers=4, hidden=256, heads=8, vocab=4096)
        inputs = {"input_ids": torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(0))}
        get = lambda o: o.logits  # noqa: E731
    else:
        raise SystemExit(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return model, inputs, get


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, inputs, device: str, reps: int) -> dict[str, float]:
    """Median ms per variant, timing the variants round-robin so a busy machine skews them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn(**inputs)
        _sync(device)
        for _ in range(reps):
            for label, fn in fns.items():
                t = time.perf_counter()
                fn(**inputs)
                _sync(device)
                times[label].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def child_start(model_name: str, device: str) -> None:
    """In a fresh process: time effcompile's first call (capture -> passes -> codegen, or cache load)."""
    import effcompile as ec

    model, inputs, _ = build(model_name, device)
    t = time.perf_counter()
    fast = ec.effcompile(model)
    with torch.no_grad():
        fast(**inputs)
    _sync(device)
    seconds = time.perf_counter() - t
    graph = ec.explain(fast).graphs[0]
    print(json.dumps({"seconds": seconds, "cache": graph.cache, "kernels": len(graph.kernels)}))


def start_times(model_name: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "EFFCOMPILE_CACHE_DIR": cache_dir}
        out = {}
        for label in ("cold", "warm"):
            r = subprocess.run([sys.executable, __file__, "--child-start", model_name, "--device", device],
                               capture_output=True, text=True, env=env, timeout=1200)
            if r.returncode != 0:
                out[label] = {"failed": r.stderr[-2000:]}
                continue
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
        return out


def dispatch_overhead_us(device: str, reps: int = 2000) -> dict:
    """Per-call cost of the compiled wrapper: a tiny model where kernel time is negligible."""
    import effcompile as ec

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).to(device).eval()
    x = torch.randn(2, 16, device=device)
    fast = ec.effcompile(model, cache=False)
    inductor = torch.compile(model)

    def per_call(fn):
        with torch.no_grad():
            for _ in range(20):
                fn(x)
            _sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                fn(x)
            _sync(device)
        return (time.perf_counter() - t) / reps * 1e6

    eager, compiled = per_call(model), per_call(fast)
    return {"eager_us": eager, "effcompile_us": compiled, "inductor_us": per_call(inductor),
            "effcompile_overhead_us": compiled - eager}


def run_model(name: str, device: str, reps: int) -> dict:
    import effcompile as ec

    model, inputs, get = build(name, device)
    with torch.no_grad():
        ref = get(model(**inputs))
    result = {"model": name, "inputs": {k: list(v.shape) for k, v in inputs.items()}}
    variants = {
        "eager": model,
        "inductor": torch.compile(model),
        "effcompile": ec.effcompile(model),
    }
    working = {}
    for label, fn in variants.items():
        try:
            with torch.no_grad():
                t = time.perf_counter()
                out = get(fn(**inputs))
                _sync(device)
                first = time.perf_counter() - t
            result[label] = {"first_call_s": first,
                             "max_abs_diff_vs_eager": (out.float() - ref.float()).abs().max().item()}
            working[label] = fn
        except Exception as e:  # a failed variant is recorded as failed, never as a number
            result[label] = {"failed": f"{type(e).__name__}: {e}"[:2000]}
    for label, ms in interleaved_medians(working, inputs, device, reps).items():
        result[label]["median_ms"] = ms
    base = result["eager"].get("median_ms")
    for label in ("inductor", "effcompile"):
        if base and "median_ms" in result[label]:
            result[label]["speedup_vs_eager"] = base / result[label]["median_ms"]
    graph = ec.explain(variants["effcompile"]).graphs[0]
    result["effcompile"]["kernels"] = len(graph.kernels)
    result["effcompile"]["kernel_paths"] = sorted(set(graph.kernel_paths().values()))
    result["start"] = start_times(name, device)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--output", default=None)
    p.add_argument("--child-start", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_start:
        return child_start(args.child_start, args.device)

    import triton

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {
        "benchmark": "spine",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "results": [run_model(m, args.device, args.reps) for m in args.models.split(",")],
        "dispatch": dispatch_overhead_us(args.device),
    }
    day = datetime.date.today().isoformat()
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"spine-{args.device}-{day}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
