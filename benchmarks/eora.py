"""EoRA-style low-rank compensation: MiniLM embedding cosine of int4 weights with and without it.

Calibration: 32 stdlib docstrings (4 batches of 8); evaluation: 32 other docstrings, mean-pooled
embeddings against eager fp32. Writes benchmarks/results/eora-cpu-<date>.json.

    python benchmarks/eora.py
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
from smoothing import MiniLMEval  # same model, calibration and held-out set

import effcompile as ec

CASES = [(128, 0), (128, 16), (128, 32), (32, 0), (32, 16)]  # (int4 group size, EoRA rank)


def main() -> None:
    ev = MiniLMEval()
    rows = []
    for group, rank in CASES:
        torch._dynamo.reset()
        cfg = ec.Quantize(weights="int4", group_size=group, eora_rank=rank)
        fast = ec.effcompile(ev.model, passes=[cfg], calibration=ev.calib if rank else None, cache=False)
        cos = ev.cosine(fast)
        (rec,) = [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "quantize"]
        layers = rec.artifacts.get("eora", {}).get("layers", {})
        rows.append({"weights": "int4", "group_size": group, "eora_rank": rank,
                     "cosine_min": round(cos.min().item(), 6), "cosine_mean": round(cos.mean().item(), 6),
                     "mean_error_removed": round(sum(v["error_removed"] for v in layers.values()) / len(layers), 4)
                     if layers else None})
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / f"eora-cpu-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"benchmark": "eora", "model": "minilm", "torch": torch.__version__,
                               "calibration": "32 stdlib docstrings (seed 1)", "eval": "32 docstrings (seed 5)",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
