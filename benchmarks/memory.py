"""Memory of a compiled zoo model: its graphs' effcompile buffers (summed, and over unique storages) and process RSS.

After a calibrated compile, one calibration prefill (2 x 64 tokens), a 1 x 16 prefill and 3 decode steps at batch 1,
so the prefill and decode graphs both exist; the unique-storage total shows what the graphs share (ir.shared_tensors).

    python benchmarks/memory.py --model llama-1b --dtype float32 \\
        --spec "quantize(weights=int4,group_size=128,targets=(attn,ffn,head))"
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch

import effcompile as ec
from effcompile.bench import spec as pass_spec
from effcompile.bench import zoo


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:  # Linux: resident pages, second field
        return int(f.read().split()[1]) * 4096 / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--spec", required=True, help="pass spec, e.g. 'quantize(weights=int4,group_size=128)'")
    p.add_argument("--cache-dir", default=None, help="compile through this disk cache (a second run is a warm start)")
    a = p.parse_args()
    zm = zoo.get_model(a.model, device="cpu", dtype=getattr(torch, a.dtype))
    model = zm.model.eval()
    calib = [zm.make_inputs(batch=2, seq=64, seed=0)]
    model_rss = _rss_gb()
    cache = {"cache_dir": a.cache_dir} if a.cache_dir else {"cache": False}
    start = time.perf_counter()
    fast = ec.effcompile(model, passes=pass_spec.parse_passes(a.spec)[1], calibration=calib, **cache)
    with torch.no_grad():
        fast(**calib[0])
        out = fast(zm.make_inputs(batch=1, seq=16, seed=1)["input_ids"], use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = fast(tok, past_key_values=out.past_key_values, use_cache=True)
    seconds = time.perf_counter() - start  # compile (or warm start) and the calls above
    gc.collect()
    rep = ec.explain(fast)
    buffers = [b for g in rep.graphs for gm in g.graph_modules() for name, b in gm.named_buffers() if name.startswith("_ec_")]
    unique = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in buffers}
    print(json.dumps({"benchmark": "memory", "model": a.model, "dtype": a.dtype, "spec": a.spec, "graphs": len(rep.graphs),
                      "cache": [g.cache for g in rep.graphs],
                      "ec_buffer_gb": round(sum(b.untyped_storage().nbytes() for b in buffers) / 1e9, 3),
                      "ec_buffer_unique_gb": round(sum(unique.values()) / 1e9, 3), "rss_gb": round(_rss_gb(), 2),
                      "rss_model_gb": round(model_rss, 2), "seconds": round(seconds, 1), "kernels": sorted({k.kind for k in rep.kernels}),
                      "torch": torch.__version__, "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
    main()
