"""Layer skipping on CPU: SkipLayers quality tables, self-speculative decoding, early-exit curves.

    python benchmarks/skipping.py static minilm      # cosine/retrieval per method x unit x 1/2/3 removed
    python benchmarks/skipping.py harness minilm     # the same grid through the full bench harness (slow)
    python benchmarks/skipping.py static stdlib-lm   # perplexity per skip count and method
    python benchmarks/skipping.py speculative        # acceptance, tokens/s vs plain greedy, losslessness
    python benchmarks/skipping.py early-exit         # average exit depth and quality per threshold

Static runs go through the measurement harness (effcompile.bench.harness.sweep: quality vs eager,
prefill and decode timings) and append JSONL records to benchmarks/results/skipping-cpu-<date>.jsonl;
the others write benchmarks/results/skipping-<what>-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
DAY = datetime.date.today().isoformat()
SWEEPS = {
    "minilm": "skip_layers(num=[1,2,3],unit=[block,attn,ffn],method=[cosine,uniform,greedy])",
    "stdlib-lm": "skip_layers(num=[1,2,3],unit=[block,attn,ffn],method=[cosine,uniform,greedy])",
}


def harness_static(model: str, out: Path) -> None:
    """The full harness sweep (quality + speed per config). About 6 min per config on the shared 2-core CPU
    under load (each config recompiles every shape bucket), so only a few points were run this way."""
    from effcompile.bench import harness, report

    s = harness.BenchSettings(batch=8, inductor=False, reps=3, decode_batches=(1,), decode_steps=16,
                              calibration_batches=4, cache=False)
    records, invalid = harness.sweep(model, SWEEPS[model], s, on_record=lambda r: report.append_jsonl(out, [r]))
    print(report.markdown_table(records))


def _capture(model, **inputs):
    """The dynamo graph of one static-shape call, annotated as the backend sees it."""
    from effcompile.compiler import ir

    got = []

    def backend(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=backend, dynamic=False, fullgraph=True)(**inputs)
    gm, ex = got[0]
    ir.annotate(gm, ex)
    return gm, ex


def _args_for(example, template: dict, batch: dict) -> list:
    """The graph's positional args for another batch: the template's input tensors swapped for batch's."""
    swap = {id(template[k]): batch[k] for k in template}
    return [swap.get(id(a), a) for a in example]


def _skipped(gm, example, cfg, calib_args):
    """A copy of the graph rewritten by the SkipLayers pass itself, with its PassResult."""
    from effcompile.compiler import ir
    from effcompile.compiler.pass_manager import PassContext
    from effcompile.passes.skip_layers import skip_layers

    g = ir.copy_graph_module(gm)
    ir.tag_sublayers(g)
    res = skip_layers(g, cfg, PassContext(example, calib_args))
    g.recompile()
    return g, res


def _grid():
    from effcompile.passes import SkipLayers

    yield "none", SkipLayers(num=0)
    for unit in ("block", "attn", "ffn"):
        for num in (1, 2, 3):
            for method in ("cosine", "uniform", "greedy"):
                yield f"skip_layers(num={num},unit={unit},method={method})", SkipLayers(num=num, unit=unit,
                                                                                        method=method)


@torch.no_grad()
def static_minilm(out: Path) -> list[dict]:
    """MiniLM: embedding cosine and retrieval agreement vs eager, 128 queries x 256 stdlib docstrings."""
    import torch.nn.functional as F

    from effcompile.bench import metrics
    from effcompile.bench.corpus import stdlib_corpus
    from effcompile.testing import load_minilm

    model, tok = load_minilm()
    queries, docs, answers = metrics.retrieval_set(128, 256, 0)
    texts = queries + docs

    def enc(xs):  # one static shape for every batch, so one captured graph serves all configs
        return dict(tok(xs, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))

    batches = [enc(texts[i:i + 32]) for i in range(0, len(texts), 32)]
    gm, ex = _capture(model, **batches[0])
    calib = [_args_for(ex, batches[0], enc(stdlib_corpus(32, 1000 + i))) for i in range(2)]

    def embed(g):
        outs = []
        for b in batches:
            hidden = g(*_args_for(ex, batches[0], b))[0]
            outs.append(F.normalize(metrics.mean_pool(hidden, b["attention_mask"]), dim=-1))
        e = torch.cat(outs)
        return e[:128], e[128:]

    rq, rd = embed(gm)
    hf = F.normalize(metrics.mean_pool(model(**batches[0]).last_hidden_state, batches[0]["attention_mask"]), dim=-1)
    assert torch.allclose(hf, rq[:32], atol=1e-5), "captured graph differs from eager"
    recs = []
    for label, cfg in _grid():
        t = time.perf_counter()
        g, res = _skipped(gm, ex, cfg, calib)
        oq, od = embed(g)
        rec = {"model": "minilm", "spec": label, "unit": cfg.unit, "method": cfg.method, "num": cfg.num,
               "skipped": res.artifacts.get("skipped", []), "sublayers": res.where,
               "estimated_speedup": res.artifacts.get("estimated_speedup", 1.0),
               "scores": res.artifacts.get("scores", {}),
               "cosine": metrics.embedding_cosine(torch.cat([rq, rd]), torch.cat([oq, od])),
               "retrieval_agreement": metrics.retrieval_agreement(rq, rd, oq, od),
               "recall@1": ((oq @ od.T).argmax(-1) == torch.tensor(answers)).float().mean().item(),
               "recall@1_eager": ((rq @ rd.T).argmax(-1) == torch.tensor(answers)).float().mean().item(),
               "seconds": time.perf_counter() - t}
        print(label, rec["skipped"], round(rec["cosine"]["mean"], 4), rec["retrieval_agreement"])
        recs.append(rec)
    return recs


@torch.no_grad()
def static_lm(out: Path) -> list[dict]:
    """stdlib-lm: held-out perplexity (32 windows of 128 tokens) and next-token agreement vs eager."""
    import math

    import torch.nn.functional as F

    from effcompile.bench import metrics
    from effcompile.bench.zoo import heldout_ids, load_stdlib_lm

    model, tok = load_stdlib_lm()
    ids = heldout_ids(tok)
    wins = metrics._windows(ids, 128, 32)  # the windows the harness scores
    batches = [{"input_ids": wins[i:i + 8, :-1].contiguous()} for i in range(0, 32, 8)]
    targets = [wins[i:i + 8, 1:] for i in range(0, 32, 8)]
    gm, ex = _capture(model, **batches[0], use_cache=False)
    far = ids[20_000:20_000 + 2 * 8 * 128].reshape(2, 8, 128)  # calibration text disjoint from the scored windows
    calib = [_args_for(ex, batches[0], {"input_ids": c}) for c in far]

    def run(g):
        nll, logits = 0.0, []
        for b, y in zip(batches, targets, strict=True):
            lg = g(*_args_for(ex, batches[0], b))[0].float()
            logits.append(lg.argmax(-1))
            nll += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="sum").item()
        return math.exp(nll / sum(y.numel() for y in targets)), torch.cat(logits)

    ppl_ref, top_ref = run(gm)
    assert abs(ppl_ref - metrics.perplexity(model, ids, window=128, max_windows=32)) < 1e-3 * ppl_ref
    recs = []
    for label, cfg in _grid():
        t = time.perf_counter()
        try:
            g, res = _skipped(gm, ex, cfg, calib)
        except ValueError as e:  # e.g. 3 of 4 blocks is allowed, all 4 attn is not: recorded, not hidden
            recs.append({"model": "stdlib-lm", "spec": label, "invalid": str(e)})
            continue
        ppl, top = run(g)
        rec = {"model": "stdlib-lm", "spec": label, "unit": cfg.unit, "method": cfg.method, "num": cfg.num,
               "skipped": res.artifacts.get("skipped", []), "sublayers": res.where,
               "estimated_speedup": res.artifacts.get("estimated_speedup", 1.0),
               "scores": res.artifacts.get("scores", {}), "perplexity": ppl, "perplexity_eager": ppl_ref,
               "next_token_agreement": (top == top_ref).float().mean().item(), "seconds": time.perf_counter() - t}
        print(label, rec["skipped"], round(ppl, 3), round(rec["next_token_agreement"], 4))
        recs.append(rec)
    return recs


def static(model: str, out: Path) -> None:
    """Every method x unit x 1/2/3 removed, through the SkipLayers pass function on one captured graph
    per model (static shapes, so no recompiles), the quality metrics of effcompile.bench.metrics."""
    recs = static_minilm(out) if model == "minilm" else static_lm(out)
    meta = {"date": DAY, "device": "cpu (shared, 2 cores)", "torch": torch.__version__,
            "load_average": list(os.getloadavg())}
    with out.open("a") as f:
        for r in recs:
            f.write(json.dumps({**meta, **r}) + "\n")


def speculative(out: Path, n_prompts: int, new_tokens: int) -> None:
    from effcompile import effcompile
    from effcompile.bench.zoo import heldout_ids, load_stdlib_lm
    from effcompile.compiler.speculative import SpecStats, SpeculativeDecoder, find_draft, greedy_decode

    # Draft, verify and plain decoding are separate compilations of one forward (prefill, decode and
    # multi-token variants each): more than dynamo's default 8 cache entries per code object.
    torch._dynamo.config.recompile_limit = 64
    model, tok = load_stdlib_lm()
    ids = heldout_ids(tok)
    calib = ids[: 8 * 128].reshape(8, 128)  # the first held-out tokens; prompts come from later ones
    t = time.perf_counter()
    choice = find_draft(model, calib)
    search_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(10_000, ids.numel() - 64, (n_prompts,), generator=g).tolist()
    prompts = [ids[s:s + 32] for s in starts]
    full = effcompile(model, cache=False)
    drafts = {"searched": choice.config}
    from effcompile.passes import SkipLayers

    drafts["layers.2.ffn+layers.3.attn"] = SkipLayers(layers=("layers.2.ffn", "layers.3.attn"))
    res = {"model": "stdlib-lm", "date": DAY, "device": "cpu (shared, 2 cores)", "threads": torch.get_num_threads(),
           "load_average": list(os.getloadavg()), "prompts": n_prompts, "prompt_len": 32, "new_tokens": new_tokens,
           "search": {"seconds": search_s, "skip": list(choice.config.layers), "agreement": choice.agreement,
                      "cost": choice.cost, "expected_speedup": choice.expected_speedup, "trace": choice.trace},
           "runs": {}}
    greedy_decode(model, prompts[0], 4, step=full)  # compile the plain variants before timing
    for name, cfg in drafts.items():
        dec = SpeculativeDecoder(model, cfg, max_draft=8, cache=False)
        # Warm with whole generations: verify sees every draft length, and dynamo's automatic dynamic
        # shapes may recompile the shared forward (plain decoding included) once it has seen two lengths.
        for p in prompts[:2]:
            dec.generate_one(p, new_tokens, SpecStats())
            greedy_decode(model, p, new_tokens, step=full)
        plain_s, spec_s, eager_s, same, same_eager = 0.0, 0.0, 0.0, 0, 0
        stats = SpecStats()
        for p in prompts:  # interleaved, so load changes on the shared machine hit both alike
            t = time.perf_counter()
            ref = greedy_decode(model, p, new_tokens, step=full)
            plain_s += time.perf_counter() - t
            t = time.perf_counter()
            eager = greedy_decode(model, p, new_tokens)
            eager_s += time.perf_counter() - t
            t = time.perf_counter()
            got = dec.generate_one(p, new_tokens, stats)
            spec_s += time.perf_counter() - t
            same += bool(torch.equal(got, ref))
            same_eager += bool(torch.equal(got, eager))
        total = n_prompts * new_tokens
        res["runs"][name] = {"skip": list(cfg.layers), **stats.as_dict(),
                             "mean_draft_length": sum(stats.draft_lengths) / max(len(stats.draft_lengths), 1),
                             "identical_to_plain_compiled": same, "identical_to_eager": same_eager,
                             "tokens_per_s": {"speculative": total / spec_s, "plain_effcompile": total / plain_s,
                                              "plain_eager": total / eager_s},
                             "speedup_vs_plain_effcompile": plain_s / spec_s, "speedup_vs_eager": eager_s / spec_s}
        print(name, json.dumps(res["runs"][name], indent=1))
    out.write_text(json.dumps(res, indent=1))


# > 1 never exits (the full model), 0 always exits at the first exit point.
THRESHOLDS = {"saturation": (2.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.0),
              "confidence": (2.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)}


@torch.no_grad()
def early_exit_minilm() -> list[dict]:
    """MiniLM, saturation rule per sequence: average exit depth and embedding quality per threshold."""
    import torch.nn.functional as F

    from effcompile.bench import metrics
    from effcompile.compiler.pass_manager import PassContext
    from effcompile.passes.early_exit import EarlyExit, early_exit
    from effcompile.testing import load_minilm

    model, tok = load_minilm()
    queries, docs, _ = metrics.retrieval_set(64, 128, 0)  # half the static set: 8 thresholds to run
    texts = queries + docs
    batches = [dict(tok(texts[i:i + 32], padding="max_length", truncation=True, max_length=128,
                        return_tensors="pt")) for i in range(0, len(texts), 32)]
    gm, ex = _capture(model, **batches[0])

    def embed(g):
        e = torch.cat([F.normalize(metrics.mean_pool(g(*_args_for(ex, batches[0], b))[0], b["attention_mask"]),
                                   dim=-1) for b in batches])
        return e[:64], e[64:]

    rq, rd = embed(gm)
    early_exit(gm, EarlyExit(rule="saturation", granularity="sequence", threshold=2.0), PassContext(ex))
    sched, n = gm._ec_early_exit, 6
    recs = []
    for thr in THRESHOLDS["saturation"]:
        sched.threshold, sched.counts = thr, {}
        oq, od = embed(gm)
        rows = sum(sched.counts.values())
        depth = sum((n if k == "full" else int(k.split(".")[1]) + 1) * v for k, v in sched.counts.items()) / rows
        recs.append({"model": "minilm", "rule": "saturation", "granularity": "sequence", "threshold": thr,
                     "mean_layers_run": depth, "exits": dict(sched.counts),
                     "cosine": metrics.embedding_cosine(torch.cat([rq, rd]), torch.cat([oq, od])),
                     "retrieval_agreement": metrics.retrieval_agreement(rq, rd, oq, od)})
        print("minilm", thr, round(depth, 3), recs[-1]["cosine"], recs[-1]["retrieval_agreement"], flush=True)
    return recs


@torch.no_grad()
def early_exit_lm(n_prompts: int = 16, new_tokens: int = 24) -> list[dict]:
    """stdlib-lm, confidence rule per decode step: average exit depth and greedy agreement per threshold.
    The prompt is prefilled by the full model; each decode step runs the partitioned graph."""
    from transformers import StaticCache

    from effcompile.bench.zoo import heldout_ids, load_stdlib_lm
    from effcompile.compiler.pass_manager import PassContext
    from effcompile.passes.early_exit import EarlyExit, early_exit

    model, tok = load_stdlib_lm()
    ids = heldout_ids(tok)
    n = model.config.num_hidden_layers
    cache = StaticCache(config=model.config, max_cache_len=32 + new_tokens + 1)
    model(input_ids=ids[:32].view(1, -1), past_key_values=cache, use_cache=True)  # allocates the cache
    step = {"input_ids": ids[:1].view(1, 1)}
    gm, ex = _capture(model, **step, past_key_values=cache, use_cache=True)
    early_exit(gm, EarlyExit(rule="confidence", granularity="batch", threshold=2.0), PassContext(ex))
    sched = gm._ec_early_exit
    g = torch.Generator().manual_seed(0)
    prompts = [ids[s:s + 32].view(1, -1) for s in torch.randint(10_000, ids.numel() - 64, (n_prompts,),
                                                                   generator=g).tolist()]

    def decode(p):
        for layer in cache.layers:
            layer.keys.zero_(), layer.values.zero_(), layer.cumulative_length.fill_(0)
        tokv = model(input_ids=p, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1).view(1, 1)
        toks = [tokv]
        for _ in range(new_tokens - 1):
            logits = gm(*_args_for(ex, step, {"input_ids": toks[-1]}))[sched.scored]
            toks.append(logits[:, -1].argmax(-1).view(1, 1))
        return torch.cat(toks, 1)

    sched.threshold = 2.0
    full = [decode(p) for p in prompts]
    recs = []
    for thr in THRESHOLDS["confidence"]:
        sched.threshold, sched.counts = thr, {}
        outs = [decode(p) for p in prompts]
        steps = sum(sched.counts.values())
        depth = sum((n if k == "full" else int(k.split(".")[1]) + 1) * v for k, v in sched.counts.items()) / steps
        same = torch.stack([(o == f).float().mean() for o, f in zip(outs, full, strict=True)]).mean().item()
        prefix = torch.stack([(o == f).long().cumprod(1).sum() / new_tokens for o, f in zip(outs, full,
                                                                                             strict=True)])
        recs.append({"model": "stdlib-lm", "rule": "confidence", "granularity": "batch", "threshold": thr,
                     "mean_layers_run": depth, "exits": dict(sched.counts), "greedy_token_agreement": same,
                     "greedy_prefix_agreement": prefix.float().mean().item(), "prompts": n_prompts,
                     "new_tokens": new_tokens})
        print("stdlib-lm", thr, round(depth, 3), round(same, 4), flush=True)
    return recs


def early_exit_curves(out: Path) -> None:
    recs = early_exit_minilm() + early_exit_lm()
    out.write_text(json.dumps({"date": DAY, "device": "cpu (shared, 2 cores)", "layers": {"minilm": 6, "stdlib-lm": 4},
                               "load_average": list(os.getloadavg()), "curves": recs}, indent=1))


def tables() -> str:
    """Markdown tables of the committed results (what docs/skipping.md shows)."""
    lines = []
    path = RESULTS / f"skipping-static-cpu-{DAY}.jsonl"
    static = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    mini = [r for r in static if r["model"] == "minilm" and r["num"]]
    if mini:
        lines += ["**MiniLM-L6** (6 layers), 128 queries x 256 stdlib docstrings: mean embedding cosine vs eager / "
                  "retrieval top-1 / top-5 agreement with eager's ranking", "",
                  "| unit | removed | cosine | uniform | greedy |", "|---|---|---|---|---|"]
        for unit in ("block", "attn", "ffn"):
            for num in (1, 2, 3):
                cells = []
                for m in ("cosine", "uniform", "greedy"):
                    r = next(x for x in mini if (x["unit"], x["num"], x["method"]) == (unit, num, m))
                    ra = r["retrieval_agreement"]
                    cells.append(f"{r['cosine']['mean']:.3f} / {ra['top1']:.2f} / {ra['top5']:.2f} "
                                 f"({', '.join(s.removeprefix('layers.') for s in r['skipped'])})")
                lines.append(f"| {unit} | {num} | " + " | ".join(cells) + " |")
        lines.append("")
    lm = [r for r in static if r["model"] == "stdlib-lm"]
    if lm:
        base = next(r for r in lm if r.get("num") == 0)
        lines += [f"**stdlib-lm** (4 layers), held-out perplexity (32 windows x 128 tokens; eager "
                  f"{base['perplexity_eager']:.3f}) / teacher-forced next-token agreement with eager", "",
                  "| unit | removed | cosine | uniform | greedy |", "|---|---|---|---|---|"]
        for unit in ("block", "attn", "ffn"):
            for num in (1, 2, 3):
                cells = []
                for m in ("cosine", "uniform", "greedy"):
                    r = next((x for x in lm if x["spec"] == f"skip_layers(num={num},unit={unit},method={m})"), None)
                    if r is None or "invalid" in r:
                        cells.append("invalid" if r else "-")
                    else:
                        cells.append(f"{r['perplexity']:.2f} / {r['next_token_agreement']:.3f} "
                                     f"({', '.join(s.removeprefix('layers.') for s in r['skipped'])})")
                lines.append(f"| {unit} | {num} | " + " | ".join(cells) + " |")
        lines.append("")
    ee = RESULTS / f"skipping-early-exit-cpu-{DAY}.json"
    if ee.exists():
        curves = json.loads(ee.read_text())["curves"]
        lines += ["**Early exit** (exit points after every layer but the last; `threshold > 1` = never exits)", "",
                  "| model | rule | threshold | mean layers run | quality |", "|---|---|---|---|---|"]
        for c in curves:
            q = (f"cosine {c['cosine']['mean']:.3f}, top-1 {c['retrieval_agreement']['top1']:.2f}"
                 if c["model"] == "minilm" else
                 f"greedy tokens = full {c['greedy_token_agreement']:.3f}, prefix {c['greedy_prefix_agreement']:.3f}")
            lines.append(f"| {c['model']} | {c['rule']} ({c['granularity']}) | {c['threshold']} | "
                         f"{c['mean_layers_run']:.2f} | {q} |")
        lines.append("")
    sp = RESULTS / f"skipping-speculative-cpu-{DAY}.json"
    if sp.exists():
        d = json.loads(sp.read_text())
        lines += [f"**Self-speculative decoding**, stdlib-lm, {d['prompts']} prompts x {d['new_tokens']} new tokens, "
                  f"greedy; search chose {d['search']['skip']} (agreement {d['search']['agreement']:.3f}, cost "
                  f"{d['search']['cost']:.2f}, expected {d['search']['expected_speedup']:.2f}x)", "",
                  "| draft skips | acceptance | tokens/round | mean draft len | identical to plain | tok/s spec | "
                  "tok/s plain (effcompile) | tok/s plain (eager) | speedup vs plain effcompile |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in d["runs"].values():
            t = r["tokens_per_s"]
            lines.append(f"| {', '.join(r['skip'])} | {r['acceptance_rate']:.3f} | {r['tokens_per_round']:.2f} | "
                         f"{r['mean_draft_length']:.2f} | {r['identical_to_plain_compiled']}/{d['prompts']} | "
                         f"{t['speculative']:.1f} | {t['plain_effcompile']:.1f} | {t['plain_eager']:.1f} | "
                         f"{r['speedup_vs_plain_effcompile']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["static", "harness", "speculative", "early-exit", "tables"])
    p.add_argument("model", nargs="?", default="minilm", choices=sorted(SWEEPS))
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    if a.what == "tables":
        print(tables())
    elif a.what == "static":
        static(a.model, RESULTS / f"skipping-static-cpu-{DAY}.jsonl")
    elif a.what == "harness":
        harness_static(a.model, RESULTS / f"skipping-cpu-{DAY}.jsonl")
    elif a.what == "speculative":
        speculative(RESULTS / f"skipping-speculative-cpu-{DAY}.json", a.prompts, a.new_tokens)
    else:
        early_exit_curves(RESULTS / f"skipping-early-exit-cpu-{DAY}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
