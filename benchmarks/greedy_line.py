"""Diagnose a greedy threshold allocation on MiniLM: quality along the line from uniform to it.

Allocation(lam) = target + lam * (greedy - target) keeps the weighted sparsity on target for every lam.
For each lam the pass is compiled with that allocation forced (fitted in order as usual), and the
script records held-out quality (mean cosine, retrieval top-1, as benchmarks/thresholding.py) next to
the calibration objectives the greedy search can minimize ("mse", "cosine", via the pass's own
_distance). An objective that keeps falling while held-out quality turns down is the wrong objective.

    python benchmarks/greedy_line.py --target 0.6 --metric mse --out results/x.json [--alloc saved.json]

--alloc reuses a saved allocation ({layer label: sparsity}, written by an earlier run) instead of
searching again (12-20 min on MiniLM, 2 cores, until session 20; about half that since).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from effcompile.bench import record
from effcompile.passes import threshold_greedy as tg

sys.path.insert(0, str(Path(__file__).parent))
import thresholding  # noqa: E402  (the same data, quality and sparsity accounting)


def _objectives(fast, model, batches) -> dict:
    out = {}
    for metric in tg.GREEDY_METRICS:
        total = 0.0
        for b in batches:
            with torch.no_grad():
                got, ref = (pytree.tree_leaves(f(**b)) for f in (fast, model))
            total += sum(tg._distance(o.float(), r.float(), metric) for o, r in zip(got, ref, strict=True)
                         if isinstance(r, torch.Tensor) and r.is_floating_point())
        out[metric] = round(total / len(batches), 5)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--metric", default="mse", choices=tg.GREEDY_METRICS, help="the greedy search's objective")
    ap.add_argument("--lams", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--alloc", type=Path, help="a saved allocation to reuse (skips the search)")
    ap.add_argument("--save-alloc", type=Path, help="where to write the searched allocation")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    searched = json.loads(a.alloc.read_text()) if a.alloc else None
    search = tg.allocate
    lam_now = [1.0]

    def forced(gm, sites, bufs, calib, cfg, ctx):
        nonlocal searched
        if searched is None:
            searched = search(gm, sites, bufs, calib, cfg, ctx)[0]
            if a.save_alloc:
                a.save_alloc.write_text(json.dumps(searched, indent=1))
        lam = lam_now[0]
        return {k: cfg.sparsity + lam * (v - cfg.sparsity) for k, v in searched.items()}, {"lam": lam}

    tg.allocate = forced  # the rest of the pass (the in-order fit, buffers, explain) runs unchanged
    rows = []
    # minilm_cases builds the model, data and quality functions; drive it one lam at a time.
    for lam in (float(x) for x in a.lams.split(",")):
        lam_now[0] = lam
        t0 = time.perf_counter()
        (rec,) = thresholding.minilm_cases(["greedy"], [a.target], 8, 128, 256, {"greedy_metric": a.metric},
                                           keep=True)
        fast, model, calib = rec.pop("_compiled")
        rows.append({"lam": lam, "cosine": rec["cosine"], "retrieval_agreement": rec["retrieval_agreement"],
                     "achieved_weighted": rec["achieved"]["weighted"],
                     "calibration_objectives": _objectives(fast, model, calib[:4]),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    a.out.write_text(json.dumps({
        "benchmark": "greedy_line", "model": "minilm", "target": a.target, "search_metric": a.metric,
        "allocation": searched, "rows": rows, "versions": record.versions(), "device": record.device_name("cpu"),
        "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "note": "calibration objectives on the 4 batches the search scores on; quality on held-out text"},
        indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
