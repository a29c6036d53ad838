"""Greedy-decode tokens/s of a Llama-style model under quantization and channel-thresholding passes vs eager and TorchAO.

Speed only: the model is a zoo random-init Llama (``llama-base``, 110 M, on the CPU; ``llama-1b``,
Llama-3.2-1B-shaped, on a GPU), big enough that a decode step is bound by reading its weights; quality of
these passes is measured on real weights elsewhere (benchmarks/quantize.py, thresholding.py). Each config
is compiled with effcompile (calibration: 4 random-token batches, --calib-batches, for the thresholds), then timed with the
harness's static-KV-cache decode loop (effcompile.bench.timing.decode_speed) at batch 1 and 8; on CUDA a
step is captured in a CUDA graph and replayed, as serving stacks run decode. Eager is timed first and
last so drift shows. Peers, on CUDA: ``torch.compile`` of the bf16 model, and TorchAO's
Int8WeightOnlyConfig / Int4WeightOnlyConfig(group 128) quantizing a copy of the model, under
torch.compile (``torchao-int4``; ``torchao-int4-regional`` compiles the decoder layer once for all layers,
bench.peers.compile_regions, which fits a GPU session's time where a whole compiled 1B model did not) or not (``torchao-int4-eager``: its
kernels in the eager model, under the same CUDA-graph replay). A compiled peer's row counts the graphs
dynamo built, so a layer left eager (a recompile limit) shows. A ``-head`` suffix
(``torchao-int4-eager-head``) quantizes the LM head too, the peer of our ``targets=(attn,ffn,head)``.
Results are written after every batch size, so a run stopped by a time limit keeps them; every row
checks its first decode step's logits against eager's (``logits_vs_eager_b*``). A ``no-pdl:`` prefix
(``no-pdl:quantize(weights=int4,group_size=128)``) compiles and times that config with effcompile's kernels
launched without programmatic dependent launch (codegen/ops.py launch_options; EFFCOMPILE_PDL=0): the
ablation of PDL on a Hopper GPU, in the same run.

    python benchmarks/decode.py [--model llama-base] [--steps 16]                       # CPU
    python benchmarks/decode.py --device cuda --dtype bfloat16 --model llama-1b --out X.json   # GPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

import effcompile as ec
from effcompile.bench import peers, timing, zoo
from effcompile.bench import spec as pass_spec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import launch_plan
from effcompile.compiler import attention_ops

CONFIGS = ["none", "quantize(weights=int8)", "quantize(weights=int4,group_size=128)",
           "threshold(sparsity=0.4)", "threshold(sparsity=0.5)",
           "threshold(sparsity=0.5)+quantize(weights=int8)",
           "threshold(sparsity=0.5)+quantize(weights=int4,group_size=128)"]
PEERS = {  # name -> (TorchAO weight format or None: the unquantized model, how it is compiled)
    "torch.compile": (None, "whole"),
    "torchao-int8": ("int8", "whole"),
    "torchao-int4": ("int4", "whole"),
    # Regional compilation (PyTorch's recipe for cold start): each decoder layer is compiled on its own, so
    # Inductor compiles one layer's graph and the others hit its FX-graph cache. A whole compiled Llama-1B
    # did not finish within 165-210 s on the H100 (sessions 7 and 10); at batch 1 under CUDA-graph replay
    # the difference is only fusion across layer boundaries (a residual add into the next norm).
    "torch.compile-regional": (None, "regional"),
    "torchao-int8-regional": ("int8", "regional"),
    "torchao-int4-regional": ("int4", "regional"),
    # TorchAO's kernels without Inductor: its tensor subclasses dispatch per op in Python, which CUDA-graph
    # replay takes out of the timing. Built in seconds.
    "torchao-int8-eager": ("int8", None),
    "torchao-int4-eager": ("int4", None),
}
# The same peers quantizing the LM head too (as TorchAO's quickstart does), against our configs with
# targets=(attn,ffn,head): a Llama-3.2-1B step reads its 525 MB bf16 head (tied to the embedding) in ~184 us
# of ~1150 (H100, session 13).
PEERS.update({name + "-head": which for name, which in PEERS.items() if which[0] is not None})


def _peer(model, which: tuple[str | None, str | None], head: bool = False):
    """The peer for ``which``: TorchAO quantizes a copy of the model (its LM head too with ``head``), then
    torch.compile (whole, by region, or not at all)."""
    fmt, how = which
    peer = copy.deepcopy(model) if fmt is not None or how == "regional" else model
    if fmt is not None:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        cfg = Int8WeightOnlyConfig() if fmt == "int8" else Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="tile_packed_to_4d")
        # TorchAO's quickstart quantizes every nn.Linear; the LM head is one too. Ours keeps it dense by
        # default (sublayer tags), so the head is left out here as well: the same weights are quantized.
        quantize_(peer, cfg, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and (head or "lm_head" not in name))
    if how == "whole":
        return torch.compile(peer)
    if how == "regional":
        peers.compile_regions(peer)
    return peer


def _compile_breakdown(rep) -> dict:
    """Where effcompile's compile time went, over every graph of a config: the graphs' own compile seconds
    (cache-key hashing, passes, lowering, codegen; not dynamo's tracing, the calibration runs or Triton's
    first-launch builds) and each pass's seconds summed over graphs, largest first."""
    per_pass: dict[str, float] = {}
    for g in rep.graphs:
        for p in g.passes:
            per_pass[p.name] = per_pass.get(p.name, 0.0) + p.seconds
    return {"graphs": len(rep.graphs), "graph_compile": round(sum(g.compile_seconds for g in rep.graphs), 2),
            "passes": {k: round(v, 2) for k, v in sorted(per_pass.items(), key=lambda kv: -kv[1]) if v >= 0.01}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated pass specs, or peers: "
                    + ", ".join(PEERS) + " (TorchAO's int4: CUDA only)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, time the plain Python loop")
    ap.add_argument("--cache-len", type=int, default=None,
                    help="static KV cache length (default: the prompt and the steps; e.g. 4096, as a server "
                         "allocates for its longest sequence: SDPA then reads all of it every step)")
    ap.add_argument("--prefill", action="store_true",
                    help="also time a compiled prefill of one calibration batch (2 x 64 tokens: time to first token's "
                         "work) per config, median of 3 after a warm call; compiles the prefill graph where a "
                         "config would not (uncalibrated effcompile configs, peers)")
    ap.add_argument("--calib-batches", type=int, default=4,
                    help="random-token calibration batches (2 x 64 tokens each) for calibrated configs (default 4); "
                         "a speed-only run on random weights can take 1: the thresholds' calibrated prefill runs "
                         "the model twice per batch (recording, then the in-order fit; 4 times until session 18, "
                         "when the 8B thresholds config spent 65 s in calibration and its compiled prefill on an "
                         "H100 with 4)")
    ap.add_argument("--out", type=Path, help="result file (default results/decode-<device>-<model>-<date>.json)")
    a = ap.parse_args()
    if a.calib_batches < 1:
        ap.error(f"--calib-batches must be at least 1, got {a.calib_batches}")
    dtype = getattr(torch, a.dtype)
    zm = zoo.get_model(a.model, device=a.device, dtype=dtype)
    model = zm.model.to(device=a.device, dtype=dtype).eval()
    calib = [zm.make_inputs(batch=2, seq=64, seed=s) for s in range(a.calib_batches)]
    batches = [int(b) for b in a.batches.split(",")]
    prompts = {b: zm.make_inputs(batch=b, seq=32, seed=100 + b)["input_ids"].to(a.device) for b in batches}
    graphs = torch.device(a.device).type == "cuda" and not a.no_cuda_graph
    machine = torch.cuda.get_device_name() if torch.device(a.device).type == "cuda" else "2-core CPU dev box"
    out = a.out or Path(__file__).parent / "results" / (
        f"decode-{a.device}-{a.model}-{datetime.date.today().isoformat()}.json")
    rows: list[dict] = []

    def write() -> None:
        # Ratios against the mean of the eager rows so far (first, and last once it ran).
        eager = [r for r in rows if r["config"].startswith("eager")]
        for r in rows:
            if "failed" not in r and not r["config"].startswith("eager") and eager:
                r.update({f"vs_eager_b{b}": round(r[f"tok_s_b{b}"] * len(eager) / sum(e[f"tok_s_b{b}"] for e in eager), 3)
                          for b in batches if f"tok_s_b{b}" in r and all(f"tok_s_b{b}" in e for e in eager)})
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            import torchao

            ao = torchao.__version__
        except Exception:  # noqa: BLE001 - the peer is optional
            ao = "not installed"
        out.write_text(json.dumps({
            "benchmark": "decode", "model": a.model, "device": machine, "dtype": a.dtype, "steps": a.steps,
            "cache_len": a.cache_len, "calibration_batches": a.calib_batches,
            "cuda_graph": graphs, "versions": {"torch": torch.__version__, "torchao": ao,
                                               "python": platform.python_version()},
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "load_avg_at_start": os.getloadavg(), "rows": rows,
            # the tile each decode kernel got and where from (explain()'s list; empty off a GPU)
            "launch_shapes": [{"key": key, "shape": shape, "config": list(cfg) if cfg is not None else "built-in",
                               "source": source} for (key, shape), (cfg, source) in launch_plan.CHOSEN.items()],
        }, indent=1))

    def show(r: dict) -> None:  # the log line: a profile's kernel list stays in the JSON
        print({k: {kk: vv for kk, vv in v.items() if kk != "top"} if k.startswith("profile") and isinstance(v, dict)
               else v for k, v in r.items()}, flush=True)

    def prefill(fn, row: dict) -> None:
        """With --prefill: the median of 3 timed prefills of calib[0] after a warm (compiling) one, in ms."""
        if not a.prefill:
            return
        cuda = torch.device(a.device).type == "cuda"
        times = []
        with torch.no_grad():
            for _ in range(4):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn(**calib[0])
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        row["prefill_ms"] = round(sorted(times[1:])[1] * 1e3, 3)
        row["prefill_tokens"] = int(calib[0]["input_ids"].numel())

    def decode(fn, row: dict) -> dict:
        """Times fn at each batch size into ``row`` (already in rows), written after each one: a run stopped by
        its time limit keeps the batch sizes it finished (a compiled peer compiles again for each)."""
        t0 = time.perf_counter()
        for b in batches:
            with torch.no_grad():
                r = timing.decode_speed(fn, model, prompts[b], a.steps, 3, a.device, cuda_graph=graphs,
                                        profile=b in (batches[0], batches[-1]), cache_len=a.cache_len)
            row[f"tok_s_b{b}"] = round(r["tokens_per_s"], 2)
            row[f"ms_per_step_b{b}"] = round(r["ms_per_step"], 4)
            row["max_cache_len"] = r["max_cache_len"]  # the static cache's positions (--cache-len)
            row[f"logits_vs_eager_b{b}"] = r["logits_vs_eager"]  # the first decode step against eager's
            if "profile" in r:  # one un-graphed step's GPU kernels: busy time vs the step time = launch gaps
                row[f"profile_b{b}"] = r["profile"]
            if r["cuda_graph"] is not True and graphs:
                row[f"cuda_graph_b{b}"] = r["cuda_graph"]  # why capture failed (the plain loop was timed)
            row[f"seconds_to_b{b}"] = round(time.perf_counter() - t0, 1)  # compiling (a peer) and timing so far
            write()
            print(f"  {row['config'][:60]}: batch {b} {row[f'tok_s_b{b}']} tok/s, {row[f'seconds_to_b{b}']} s so far",
                  flush=True)
        return row

    rows.append({"config": "eager (first)"})
    prefill(model, rows[-1])
    decode(model, rows[-1])
    show(rows[-1])
    write()
    for spec in a.configs.split(";"):
        # Every config compiles the same forward: without a reset dynamo's per-code recompile limit
        # runs out after a few configs and the rest would silently run eager.
        torch._dynamo.reset()
        t0 = time.perf_counter()
        row = {"config": spec}
        rows.append(row)
        pdl_before = cg_ops.PDL_ENABLED
        if spec.startswith("no-pdl:"):
            spec, cg_ops.PDL_ENABLED = spec.removeprefix("no-pdl:"), False
        try:
            if spec in PEERS:
                # No prefill call: each new shape is another Inductor compile of the whole model, and the
                # decode steps at batch 1 and 8 need two already (session 7's run on the H100 called a
                # prefill first and TorchAO int4 did not finish within 200 s; not timed further).
                fast = _peer(model, PEERS[spec], head=spec.endswith("-head"))
                rep = None
            else:
                passes = pass_spec.parse_passes(spec)[1] if spec != "none" else []
                fast = ec.effcompile(model, passes=passes, calibration=calib if passes else None, cache=False)
                if any(getattr(p, "needs_calibration", False) for p in passes):
                    t_cal = time.perf_counter()
                    with torch.no_grad():  # a compiled prefill first: decode graphs reuse what it calibrates
                        fast(**calib[0])  # (uncalibrated configs skip it: one dynamo trace and build less)
                    row["calibrated_prefill_s"] = round(time.perf_counter() - t_cal, 1)
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            before = dict(cg_ops.PATH_COUNTS.get("bag_linear", {}))
            attention_before = dict(attention_ops.PATH_COUNTS)
            if spec not in PEERS:  # effcompile's kernels launched with PDL (a peer's kernels are not ours)
                row["pdl"] = cg_ops.pdl(torch.device(a.device))
            prefill(fast, row)
            decode(fast, row)
        except Exception as e:  # noqa: BLE001 - one failing config (e.g. a peer not installed) is recorded
            row["failed"] = f"{type(e).__name__}: {str(e)[:400]}"
            show(row)
            write()
            continue
        finally:
            cg_ops.PDL_ENABLED = pdl_before
        row["compile_and_time_s"] = round(time.perf_counter() - t0, 1)
        if spec in PEERS and PEERS[spec][1] is not None:
            row["dynamo_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        if spec not in PEERS:
            after = cg_ops.PATH_COUNTS.get("bag_linear", {})
            row["bag_calls"] = {k: after[k] - before.get(k, 0) for k in after}
            # grouped-query attention calls by path: "gqa" (SDPA reads the shared K/V heads) or "repeat"
            row["attention_calls"] = {k: n - attention_before.get(k, 0) for k, n in attention_ops.PATH_COUNTS.items()
                                      if n != attention_before.get(k, 0)}
            rep = ec.explain(fast)
            row["fallbacks"] = rep.fallbacks
            row["kernels"] = sorted({f"{k.name}:{k.kind}" for k in rep.kernels if k.ops and
                                     k.ops[0] in ("wq_linear", "sparse_linear", "kv_cache_write", "rope_kv_cache_write")})
            row["compile_breakdown_s"] = _compile_breakdown(rep)
        show(row)
        write()
        # Free this config before the next one compiles: a 1B model's sparse layout is another full copy
        # of the weights, and glibc keeps freed arenas unless trimmed (llama-1b ran out of 24 GB without).
        del fast, rep
        gc.collect()
        timing._trim_heap()
        if torch.device(a.device).type == "cuda":
            torch.cuda.empty_cache()
    rows.append({"config": "eager (last)"})
    prefill(model, rows[-1])
    decode(model, rows[-1])
    show(rows[-1])
    write()
    print("wrote", out)


if __name__ == "__main__":
    main()
