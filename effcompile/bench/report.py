"""Bench output: JSON lines, the Markdown quality/speed tables and the speed-vs-quality Pareto plot."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "markdown_table", "pareto_front", "pareto_plot", "read_jsonl", "speed_table"]


def append_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Append one JSON object per line (creating the file and its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _why(v: Any) -> str:
    if isinstance(v, dict):
        return "failed" if "failed" in v else ("skipped" if "skipped" in v else "n/a")
    return "n/a"


def _metric(q: dict, key: str) -> str:
    v = _num(q.get(key))
    return f"{q['metric']} {v:.4g}" if v is not None else "n/a"


def markdown_table(records: Sequence[dict]) -> str:
    """| Model | Passes | Base | Optimized | Recovery | Speedup | — quality of eager vs optimized, prefill speedup."""
    lines = ["| Model | Passes | Base | Optimized | Recovery | Speedup |", "|---|---|---|---|---|---|"]
    for r in records:
        q = r.get("quality") or {}
        if "failed" in q:
            base = opt = rec = "failed"
        else:
            base, opt = _metric(q, "base"), _metric(q, "optimized")
            rv = _num(q.get("recovery"))
            rec = f"{100 * rv:.1f} %" if rv is not None else "n/a"
        sp = r.get("ratios", {}).get("prefill_speedup_vs_eager")
        speed = f"{sp:.2f}x" if _num(sp) is not None else _why(sp)
        lines.append(f"| {r['model']} | `{r['passes']['spec']}` | {base} | {opt} | {rec} | {speed} |")
    return "\n".join(lines)


def _ms(entry: Any) -> str:
    v = _num(entry.get("median_ms")) if isinstance(entry, dict) else None
    return f"{v:.1f}" if v is not None else _why(entry)


def _tps(entry: Any) -> str:
    if not isinstance(entry, dict) or _num(entry.get("tokens_per_s")) is None:
        return _why(entry)
    return f"{entry['tokens_per_s']:.0f} ({entry['gb_per_s']:.2f} GB/s)"


def speed_table(records: Sequence[dict]) -> str:
    """Prefill latency of eager / torch.compile / effcompile and decode tokens/s with the bytes-read bandwidth."""
    batches = sorted({b for r in records for b, d in r["speed"]["decode"].items() if isinstance(d, dict)},
                     key=lambda b: int(b.removeprefix("batch")))
    variants = ["eager", "inductor", "effcompile"]
    if any("torchao" in r["speed"]["prefill"] for r in records):
        variants.append("torchao")  # the peer, for quantize specs
    names = " / ".join(variants)
    head = ["Model", "Passes", f"Prefill ms {names}", "Peak mem MiB (effcompile)"]
    head += [f"Decode {b} tok/s {names}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        pre = r["speed"]["prefill"]
        mem = pre.get("effcompile", {}).get("memory", {}) if isinstance(pre.get("effcompile"), dict) else {}
        peak = mem.get("peak_bytes", mem.get("delta_bytes"))
        row = [r["model"], f"`{r['passes']['spec']}`",
               " / ".join(_ms(pre.get(v)) for v in variants),
               f"{peak / 2**20:.1f}" if _num(peak) is not None else "n/a"]
        for b in batches:
            d = r["speed"]["decode"].get(b, {})
            row.append(" / ".join(_tps(d.get(v)) for v in variants))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Pareto
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _axes_data(records: Sequence[dict], key: str) -> tuple[list[tuple[float, float, str]], list[str]]:
    pts, bad = [], []
    for r in records:
        label = r["passes"]["spec"]
        rec = _num((r.get("quality") or {}).get("recovery"))
        sp = _num(r.get("ratios", {}).get(key))
        if rec is None or sp is None:
            why = (r.get("quality") or {}).get("failed") or r.get("ratios", {}).get(key)
            bad.append(f"{label}: {str(why)[:90]}")
        else:
            pts.append((sp, 100 * rec, label))
    return pts, bad


def _short(label: str) -> str:
    """Point labels: ``quantize(weights=int4,group_size=32)`` -> ``int4 g32`` (other passes keep their spec)."""
    label = re.sub(r",?group_size=None", "", label)
    label = re.sub(r"quantize\(([^()]*)\)", r"\1", label).replace("weights=", "").replace("group_size=", "g")
    return label.replace(",", " ") or "quantize"


def pareto_plot(records: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Speed (x: speedup vs eager) against quality (y: recovery %) for each record, Pareto front marked.

    One panel for prefill, and one per decode batch when the records have decode numbers. A failed point
    is listed under the plot instead of being drawn.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("pareto_plot: no records to plot")
    keys = [("prefill_speedup_vs_eager", "prefill speedup vs eager (x)")]
    decode = sorted({k for r in records for k in r.get("ratios", {})
                     if k.startswith("decode_") and k.endswith("_speedup_vs_eager")},
                    key=lambda k: int(k.split("_")[1].removeprefix("batch")))
    keys += [(k, k.removeprefix("decode_").removesuffix("_speedup_vs_eager").replace("batch", "decode batch ")
              + " speedup vs eager (x)") for k in decode]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 5.2), squeeze=False)
    failed: set[str] = set()
    q = next((r["quality"] for r in records if "metric" in (r.get("quality") or {})), {})
    metric = q.get("metric", "quality")
    ratio = "optimized / eager" if q.get("higher_is_better", True) else "eager / optimized: lower is better"
    for ax, (key, xlabel) in zip(axes[0], keys, strict=True):
        pts, bad = _axes_data(records, key)
        failed.update(bad)
        ax.axvline(1.0, color="0.6", ls="--", lw=1)
        ax.axhline(100.0, color="0.6", ls="--", lw=1)
        ax.plot([1.0], [100.0], marker="*", ms=14, color="black", ls="none", label="eager")
        ind = [v for r in records if (v := _num(r["ratios"].get("inductor_" + key))) is not None]
        if ind:  # torch.compile's speedup over eager in the same run (a sweep shares one baseline)
            ax.axvline(ind[0], color="tab:green", ls=":", lw=1.5, label=f"torch.compile ({ind[0]:.2f}x)")
        if pts:
            front = pareto_front([(x, y) for x, y, _ in pts])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.scatter(xs, ys, s=40, color="tab:blue", zorder=3, label="effcompile variants")
            fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
            ax.plot(fx, fy, color="tab:red", lw=1.5, marker="o", mfc="none", ms=12, zorder=4, label="Pareto front")
            for x, y, label in pts:
                ax.annotate(_short(label), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} recovery, % of eager ({ratio})")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.15)
    handles, labels = {}, []
    for ax in axes[0]:  # one legend for all panels, below them, so it never covers a point
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab.split(" (")[0] not in handles:
                handles[lab.split(" (")[0]] = h
                labels.append(lab)
    fig.legend(list(handles.values()), labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    r0 = records[0]
    fig.suptitle(title or f"{r0['model']} on {r0.get('device_name', r0['device'])} ({r0['dtype']}), "
                 f"{r0['date'][:10]}: speed vs quality", fontsize=11)
    if failed:
        fig.text(0.01, 0.005, "not plotted: " + "; ".join(sorted(failed))[:300], fontsize=7, color="tab:red")
    fig.tight_layout(rect=(0, 0.09 if failed else 0.06, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
