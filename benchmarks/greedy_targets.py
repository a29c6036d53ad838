"""MiniLM greedy thresholding at several targets from one curve measurement (JSONL, like thresholding.py).

The greedy search measures each (block, kind) group's error curve on the calibration data, then
allocates; the curves do not depend on the target. Each compile here would measure them again (12-20
minutes on 2 CPU cores), so the pass's ``_error`` is memoized on the threshold buffers' values: same
calibration data, same graph, same thresholds, same error; the curves (``_curves``) likewise, by levels and
groups. The allocations are the pass's own.

    python benchmarks/greedy_targets.py --metric pooled --out benchmarks/results/threshold-....jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import thresholding  # noqa: E402

from effcompile.bench import record  # noqa: E402
from effcompile.passes import threshold_greedy as tg  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metric", default="cosine", choices=tg.GREEDY_METRICS)
    ap.add_argument("--method", default="greedy", choices=["greedy", "greedy-channel"])
    ap.add_argument("--targets", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--docs", type=int, default=700)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    base, memo = tg._error, {}

    def error(gm, batches, refs, metric, skip_padding=False):
        key = (metric, skip_padding,
               tuple(round(float(v.sum()), 9) for k, v in gm.named_buffers() if k.startswith("_ec_thr_")))
        if key not in memo:
            memo[key] = base(gm, batches, refs, metric, skip_padding)
        return memo[key]

    base_curves, curves_memo = tg._curves, {}

    def curves(gm, groups, bufs, calib, levels, batches, refs, metric, skip_padding):
        key = (metric, skip_padding, tuple(levels), tuple(groups))
        if key not in curves_memo:
            curves_memo[key] = base_curves(gm, groups, bufs, calib, levels, batches, refs, metric, skip_padding)
        return curves_memo[key]

    tg._error, tg._curves = error, curves
    meta = {"versions": record.versions(), "device": record.device_name("cpu"), "threads": 1,
            "note": "greedy curves measured once for all targets (benchmarks/greedy_targets.py)"}
    targets = [float(t) for t in a.targets.split(",")]
    with open(a.out, "a") as f:
        for rec in thresholding.minilm_cases([a.method], targets, 8, a.queries, a.docs, {"greedy_metric": a.metric}):
            rec.update(meta)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(rec["target"], round(rec["cosine"]["mean"], 4), rec["retrieval_agreement"],
                  round(rec["achieved"]["weighted"], 4), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
