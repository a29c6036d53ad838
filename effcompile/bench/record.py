"""Record helpers: versions, device names, JSON-safe configs, the explain() summary and speed ratios."""

from __future__ import annotations

import platform
from typing import Any

import torch

from effcompile.bench import spec as specs

__all__ = ["config_json", "device_name", "explain_summary", "jsonable", "ratios", "versions"]


def versions() -> dict[str, str]:
    """Versions of everything that changes the numbers."""
    import effcompile

    out = {"effcompile": effcompile.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is a fact to record, not a crash
            out[mod] = "not installed"
    return out


def device_name(device: str) -> str:
    """The GPU's name, else the CPU model from /proc/cpuinfo."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def jsonable(v: Any) -> Any:
    """Configs and artifacts as JSON values: tuples become lists, anything exotic its repr."""
    if isinstance(v, tuple | list):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return repr(v)


def config_json(cfg) -> dict:
    """A pass config as the record stores it: spec name, class, lossy flag and every field."""
    fields = {f.name: jsonable(getattr(cfg, f.name)) for f in specs.config_fields(type(cfg))}
    return {"pass": specs.snake_case(type(cfg).__name__), "type": type(cfg).__name__,
            "lossy": bool(getattr(cfg, "lossy", False)), "fields": fields}


def explain_summary(compiled) -> dict:
    """The part of explain() a record keeps: graphs, breaks, fallbacks, rewrite counts, kernels, pass artifacts."""
    import effcompile as ec

    rep = ec.explain(compiled)
    paths: dict[str, int] = {}
    artifacts = []
    for g in rep.graphs:
        for path in g.kernel_paths().values():
            paths[path] = paths.get(path, 0) + 1
        for p in g.passes:
            if p.artifacts:  # scalars only: per-layer tables stay in explain()
                artifacts.append({"graph": g.index, "pass": p.name,
                                  **{k: jsonable(v) for k, v in p.artifacts.items() if not isinstance(v, dict)}})
    return {"graphs": len(rep.graphs), "graph_breaks": list(rep.graph_breaks), "fallbacks": list(rep.fallbacks),
            "fired": rep.fired(), "kernels": len(rep.kernels), "kernel_paths": paths, "artifacts": artifacts,
            "compile_seconds": sum(g.compile_seconds for g in rep.graphs)}


def _ratio(num: dict, den: dict, key: str, names: tuple[str, str]) -> Any:
    """num[key] / den[key], or why not (a failed or skipped side is never turned into a number)."""
    for side, name in ((num, names[0]), (den, names[1])):
        if "skipped" in side:
            return {"skipped": f"{name}: {side['skipped']}"}
        if key not in side:
            return {"failed": f"{name} failed"}
    return num[key] / den[key]


def ratios(speed: dict) -> dict:
    """Speedups of effcompile over eager and over torch.compile (and torch.compile over eager), same run."""
    pre = speed["prefill"]
    out = {"inductor_prefill_speedup_vs_eager": _ratio(pre["eager"], pre["inductor"], "median_ms",
                                                       ("eager", "inductor")),
           "prefill_speedup_vs_eager": _ratio(pre["eager"], pre["effcompile"], "median_ms", ("eager", "effcompile")),
           "prefill_speedup_vs_inductor": _ratio(pre["inductor"], pre["effcompile"], "median_ms",
                                                 ("inductor", "effcompile"))}
    if "torchao" in pre:
        out["prefill_speedup_vs_torchao"] = _ratio(pre["torchao"], pre["effcompile"], "median_ms",
                                                   ("torchao", "effcompile"))
    for b, d in speed["decode"].items():
        if isinstance(d, dict) and "eager" in d and "inductor" in d:
            out[f"inductor_decode_{b}_speedup_vs_eager"] = _ratio(d["inductor"], d["eager"], "tokens_per_s",
                                                                  ("inductor", "eager"))
        if isinstance(d, dict) and "effcompile" in d:
            out[f"decode_{b}_speedup_vs_eager"] = _ratio(d["effcompile"], d["eager"], "tokens_per_s",
                                                         ("effcompile", "eager"))
            out[f"decode_{b}_speedup_vs_inductor"] = _ratio(d["effcompile"], d["inductor"], "tokens_per_s",
                                                            ("effcompile", "inductor"))
        if isinstance(d, dict) and "effcompile" in d and "torchao" in d:
            out[f"decode_{b}_speedup_vs_torchao"] = _ratio(d["effcompile"], d["torchao"], "tokens_per_s",
                                                           ("effcompile", "torchao"))
            out[f"torchao_decode_{b}_speedup_vs_eager"] = _ratio(d["torchao"], d["eager"], "tokens_per_s",
                                                                 ("torchao", "eager"))
    return out
