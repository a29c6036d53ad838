"""Token merging / pruning benchmark: MiniLM (MergeTokens) and the stdlib LM (PruneTokens), quality and speed.

MiniLM, batch 8 x 128 real tokens (held-out stdlib docstrings, no padding), CPU: latency of eager,
effcompile without the pass and effcompile + MergeTokens, interleaved round-robin in one process (so
machine noise hits all alike); quality vs eager: mean-pooled embedding cosine over 64 such chunks,
chunk-to-chunk retrieval agreement (top-1/top-5), and the harness's short-text retrieval set.

stdlib LM: for each keep ratio, layer K and method, prefill a 96-token prompt with PruneTokens, then
teacher-force the next 32 tokens on the pruned KV cache: perplexity of those tokens and next-token
agreement with the unpruned model; prefill latency (8 x 128) interleaved as above.

    python benchmarks/tokens.py [--reps 10] [--out benchmarks/results/tokens-cpu-<date>.jsonl] [--skip-lm]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import effcompile as ec
from effcompile.bench import corpus, zoo
from effcompile.bench.metrics import compare_encoders, mean_pool, ranking_agreement
from effcompile.passes.merge_tokens import MergeTokens
from effcompile.passes.prune_tokens import PruneTokens

ROOT = Path(__file__).resolve().parents[1]


def dense_batches(tok, n_batches: int, batch: int = 8, seq: int = 128, seed: int = 0) -> list[dict]:
    """Batches of ``seq`` real tokens per row (concatenated held-out docstrings): no padding at all."""
    docs = corpus.stdlib_docstrings("all")  # MiniLM never saw the stdlib; the held-out split is too small
    random.Random(seed).shuffle(docs)
    texts, cur = [], ""
    for d in docs:
        cur += " " + d
        if len(tok(cur)["input_ids"]) > seq + 8:
            texts.append(cur)
            cur = ""
        if len(texts) == n_batches * batch:
            break
    if len(texts) < n_batches * batch:
        raise ValueError(f"only {len(texts)} chunks of {seq} tokens, need {n_batches * batch}")
    enc = tok(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    assert int(enc["attention_mask"].sum()) == enc["attention_mask"].numel(), "a chunk is shorter than seq"
    return [{k: v[i * batch:(i + 1) * batch] for k, v in enc.items()} for i in range(n_batches)]


def round_robin(fns: dict, args: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm: compile and first-call effects out of the timings
            f(**args)
            f(**args)
        for _ in range(reps):
            for k, f in fns.items():
                t = time.perf_counter()
                f(**args)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "reps": reps} for k, v in times.items()}


def _speed(speed: dict, name: str) -> dict:
    return {"ms": speed[name], "eager_ms": speed["eager"], "no_pass_ms": speed["none"],
            "speedup_vs_eager": speed["eager"]["median_ms"] / speed[name]["median_ms"],
            "speedup_vs_no_pass": speed["none"]["median_ms"] / speed[name]["median_ms"]}


def _embed(model, batches):
    with torch.no_grad():
        return torch.cat([F.normalize(mean_pool(model(**b).last_hidden_state, b["attention_mask"]), dim=-1)
                          for b in batches])


def minilm(args, emit) -> None:
    zm = zoo.get_model("minilm")
    model, tok = zm.model, zm.tokenizer
    batches = dense_batches(tok, args.quality_batches)
    configs = {"none": []}
    for ratio in args.ratios:
        for sched in ("constant", "decreasing"):
            configs[f"merge_tokens(ratio={ratio},schedule={sched})"] = [MergeTokens(ratio=ratio, schedule=sched)]
    for ratio in args.extra_ratios:
        configs[f"merge_tokens(ratio={ratio},schedule=decreasing)"] = [MergeTokens(ratio=ratio, schedule="decreasing")]
    fns = {"eager": model}
    for name, passes in configs.items():
        torch._dynamo.reset()
        fns[name] = ec.effcompile(model, passes=passes, dynamic=False, cache=False)
    if args.quality_only:
        speed = None
    else:
        speed = round_robin(fns, batches[0], args.reps)
        print("speed", json.dumps(speed), flush=True)
    if args.speed_only:
        for name in configs:
            emit({"model": "minilm", "passes": name, "shape": [8, 128], "speed": _speed(speed, name)})
        return
    ref = _embed(model, batches)
    ref_scores = ref @ ref.T - 2 * torch.eye(len(ref))  # a chunk never retrieves itself
    for name, passes in configs.items():
        # A fresh dynamo cache per config: all configs compile the same forward, and dynamo runs it
        # eagerly once recompile_limit entries exist (the short-text batches add one per length).
        torch._dynamo.reset()
        fns[name] = ec.effcompile(model, passes=passes, cache=False)
        out = _embed(fns[name], batches)
        cos = F.cosine_similarity(ref, out, dim=-1)
        agree = ranking_agreement(ref_scores, out @ out.T - 2 * torch.eye(len(out)))
        short = compare_encoders(model, fns[name], tok, n_queries=args.n_queries, n_docs=args.n_docs)
        report = ec.explain(fns[name])
        assert not report.fallbacks, report.fallbacks
        fired = [p for g in report.graphs for p in g.passes if p.name == "merge_tokens"]
        emit({"model": "minilm", "passes": name, "shape": [8, 128],
              **({"speed": _speed(speed, name)} if speed else {}),
              "quality": {"dense128_cosine_mean": cos.mean().item(), "dense128_cosine_min": cos.min().item(),
                          "dense128_retrieval": agree, "n_chunks": len(ref), "short_text": short},
              "pass": [{"modified": p.modified, "note": p.note, "artifacts": p.artifacts} for p in fired]})


def _lm_windows(ids, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g).tolist()
    return torch.stack([ids[s:s + length] for s in starts])


def lm_quality(model, fast, wins, prompt):
    """Perplexity of the tokens after a (pruned) prompt, teacher-forced on its KV cache; next-token agreement.

    The continuation is fed one token per call (eager decode on the pruned cache, the plain model as
    users have it): HF builds one attention mask for all layers from layer 0's cache length, so a
    multi-token chunk on a pruned cache needs prune_tokens.enable_pruned_chunks(model) (single-token
    decode needs no mask).
    """
    nll, n, agree = 0.0, 0, 0.0
    with torch.no_grad():
        for b in wins.split(8):
            ref = model(input_ids=b).logits[:, prompt - 1:-1]
            pre = fast(input_ids=b[:, :prompt], use_cache=True)
            cache, steps = pre.past_key_values, [pre.logits[:, -1]]
            for t in range(prompt, b.shape[1] - 1):
                out = model(input_ids=b[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[:, -1])
            logits = torch.stack(steps, 1)
            tgt = b[:, prompt:]
            nll += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum").item()
            n += tgt.numel()
            agree += (logits.argmax(-1) == ref.argmax(-1)).float().sum().item()
    return {"perplexity": float(torch.tensor(nll / n).exp()), "next_token_agreement": agree / n, "tokens": n}


def stdlib_lm(args, emit) -> None:
    model, tok = zoo.load_stdlib_lm()
    ids = zoo.heldout_ids(tok)
    wins = _lm_windows(ids, args.lm_windows, 128)
    prompt = 96
    grid = [("none", [])] + [
        (f"prune_tokens(keep_ratio={r},layer={k},method={m})", [PruneTokens(keep_ratio=r, layer=k, method=m)])
        for m in ("received", "last") for k in (1, 2, 3) for r in args.keep_ratios]
    for name, passes in ([] if args.speed_only else grid):
        torch._dynamo.reset()
        fast = ec.effcompile(model, passes=passes, dynamic=False, cache=False)
        emit({"model": "stdlib-lm", "passes": name, "prompt": prompt, "continuation": 128 - prompt,
              "quality": lm_quality(model, fast, wins, prompt)})
    fns = {"eager": model}
    speed_cfgs = {"none": [], **{f"prune_tokens(keep_ratio={r},layer={k})": [PruneTokens(keep_ratio=r, layer=k)]
                                 for k in (1, 2) for r in (0.5, 0.25)}}
    for name, passes in speed_cfgs.items():
        torch._dynamo.reset()
        fns[name] = ec.effcompile(model, passes=passes, dynamic=False, cache=False)
    speed = round_robin({k: (lambda f: lambda **kw: f(**kw, use_cache=True))(f) for k, f in fns.items()},  # noqa: B023
                        {"input_ids": wins[:8]}, args.reps)
    for name in speed_cfgs:
        emit({"model": "stdlib-lm", "passes": name, "shape": [8, 128], "phase": "prefill",
              "speed": _speed(speed, name)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--quality-batches", type=int, default=8, help="8 x 128-token chunks each")
    p.add_argument("--n-queries", type=int, default=64)
    p.add_argument("--n-docs", type=int, default=128)
    p.add_argument("--lm-windows", type=int, default=32)
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--quality-only", action="store_true")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--extra-ratios", type=float, nargs="*", default=[],
                   help="more MergeTokens ratios, decreasing schedule only (speed curve)")
    date = datetime.date.today().isoformat()
    p.add_argument("--out", type=Path, default=ROOT / f"benchmarks/results/tokens-cpu-{date}.jsonl")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "load_average": list(os.getloadavg()), "torch": torch.__version__, "date": date,
           "note": "shared 2-core machine: speed was measured interleaved (round-robin) in one process"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        def emit(rec):
            rec = {**rec, "env": {**env, "load_average": list(os.getloadavg())}}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(json.dumps(rec)[:400])
        if not args.skip_minilm:
            minilm(args, emit)
        if not args.skip_lm:
            stdlib_lm(args, emit)


if __name__ == "__main__":
    main()
