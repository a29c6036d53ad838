"""ThresholdChannels quality and achieved sparsity per method and target, on MiniLM and the stdlib LM (JSONL).

    python benchmarks/thresholding.py --out benchmarks/results/threshold-cpu-2026-11-26.jsonl

Calibration always uses the *train* split of the stdlib; quality and achieved sparsity are measured on
the *held-out* split (text the calibration never saw). Achieved sparsity is counted by
``measure_sparsity()`` over every targeted linear input of the held-out run, per layer; ``weighted`` is
the mean weighted by weight size (the fraction of weight bytes a sparse GEMV skips), the quantity the
target constrains. MiniLM batches are padded to 64 tokens: its sparsity is counted over real tokens only
(``count_rows``), and the pass calibrates on real tokens (``skip_padding``, default since session 6).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import effcompile as ec  # noqa: E402
from effcompile.bench import corpus, metrics, record, train_lm  # noqa: E402
from effcompile.compiler.sparse_ops import count_rows, measure_sparsity  # noqa: E402

METHODS = ("tensor", "channel", "greedy")
TARGETS = (0.25, 0.4, 0.5, 0.6)


def _weighted(achieved: dict[str, float], rep) -> dict:
    layers = {}
    for g in rep.graphs:
        for p in g.passes:
            layers.update((p.artifacts or {}).get("layers", {}))
    both = [k for k in layers if k in achieved]
    if not both:
        return {"weighted": None, "mean": None, "layers": 0}
    w = {k: layers[k]["weight_elements"] for k in both}
    dev = [achieved[k] - layers[k]["target"] for k in both]
    return {"weighted": sum(achieved[k] * w[k] for k in both) / sum(w.values()),
            "mean": sum(achieved[k] for k in both) / len(both), "layers": len(both),
            "max_abs_layer_deviation": max(abs(d) for d in dev),
            "per_layer": {k: {"target": layers[k]["target"], "achieved": round(achieved[k], 4)} for k in both}}


# ----------------------------------------------------------------------------- MiniLM
def minilm_cases(methods, targets, n_calib: int, n_queries: int, n_docs: int, greedy: dict | None = None,
                 keep: bool = False, common: dict | None = None):
    from effcompile.testing import load_minilm

    model, tok = load_minilm()
    # The held-out split has too few two-sentence docstrings for a retrieval set: take it from all of
    # the stdlib and calibrate on train-split docstrings that share no sentence with it.
    queries, docs, _ = corpus.retrieval_set(n_queries, n_docs, seed=0, split="all")
    used = set(queries) | set(docs)
    texts = [t for t in corpus.stdlib_corpus(16 * n_calib + 200, seed=7, split="train")
             if not any(u in t for u in used)][:16 * n_calib]
    # Fixed length (padding to 64): one graph, no per-length recompiles, the same for every method.
    enc = lambda t: dict(tok(t, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))  # noqa: E731
    calib = [enc(texts[i * 16:(i + 1) * 16]) for i in range(n_calib)]

    def embed(fn):
        out = []
        for chunk in (queries, docs):
            embs = []
            for i in range(0, len(chunk), 32):
                b = enc(chunk[i:i + 32])
                if b["input_ids"].shape[0] < 32:  # pad the batch too: one shape, one graph
                    pad = 32 - b["input_ids"].shape[0]
                    b = {k: torch.cat([v, v[:1].expand(pad, -1)]) for k, v in b.items()}
                    keep = 32 - pad
                else:
                    keep = 32
                real = b["attention_mask"].bool().clone()
                real[keep:] = False  # the batch-filling copies are not part of the set
                with torch.no_grad(), count_rows(real):  # achieved sparsity over real tokens, not padding
                    h = metrics._hidden_of(fn(**b))
                embs.append(torch.nn.functional.normalize(metrics.mean_pool(h.float(), b["attention_mask"]), dim=-1)[:keep])
            out.append(torch.cat(embs))
        return out

    rq, rd = embed(model)
    for method in methods:
        for s in targets:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            extra = {**(common or {}), **((greedy or {}) if method.startswith("greedy") else {})}
            fast = ec.effcompile(model, passes=[ec.ThresholdChannels(sparsity=s, method=method, **extra)],
                                 calibration=calib, cache=False)
            with measure_sparsity() as achieved:
                oq, od = embed(fast)
            cos = metrics.embedding_cosine(torch.cat([rq, rd]), torch.cat([oq, od]))
            agree = metrics.retrieval_agreement(rq, rd, oq, od)
            rec = {"model": "minilm", "method": method, "target": s, "cosine": cos, "retrieval_agreement": agree,
                   "achieved": _weighted(achieved, ec.explain(fast)), "artifacts": _scalars(fast),
                   "seconds": round(time.perf_counter() - t0, 1), "n_queries": n_queries, "n_docs": n_docs,
                   "options": extra,
                   "calibration": f"{n_calib} x 16 train-split docstrings (none in the retrieval set), padded to 64"}
            if keep:  # benchmarks/greedy_line.py scores the compiled model on the calibration data too
                rec["_compiled"] = (fast, model, calib)
            yield rec


# ----------------------------------------------------------------------------- stdlib LM
def lm_cases(methods, targets, n_calib: int, windows: int, greedy: dict | None = None, common: dict | None = None):
    from effcompile.bench.zoo import heldout_ids, load_stdlib_lm

    model, tok = load_stdlib_lm()
    window = 128
    train_ids = train_lm.encode_docs(tok.backend_tokenizer, [t for _, t in corpus.stdlib_sources("train")[:400]])
    g = torch.Generator().manual_seed(7)
    calib = []
    for _ in range(n_calib):
        starts = torch.randint(0, train_ids.numel() - window, (8,), generator=g).tolist()
        calib.append({"input_ids": torch.stack([train_ids[i:i + window - 1] for i in starts]), "use_cache": False})
    ids = heldout_ids(tok)
    wins = metrics._windows(ids, window, 8)

    def quality(fn):
        ppl = metrics.perplexity(lambda **kw: fn(**kw, use_cache=False), ids, window=window, max_windows=windows)
        with torch.no_grad():
            logits = metrics.logits_of(fn(input_ids=wins[:, :-1], use_cache=False))
        return ppl, logits

    dense_ppl, dense_logits = quality(model)
    yield {"model": "stdlib-lm", "method": "eager", "target": 0.0, "perplexity": dense_ppl, "windows": windows}
    for method in methods:
        for s in targets:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            extra = {**(common or {}), **((greedy or {}) if method.startswith("greedy") else {})}
            fast = ec.effcompile(model, passes=[ec.ThresholdChannels(sparsity=s, method=method, **extra)],
                                 calibration=calib, cache=False)
            with measure_sparsity() as achieved:
                ppl, logits = quality(fast)
            yield {"model": "stdlib-lm", "method": method, "target": s, "perplexity": ppl,
                   "perplexity_dense": dense_ppl, "next_token": metrics.next_token_agreement(dense_logits, logits),
                   "achieved": _weighted(achieved, ec.explain(fast)), "artifacts": _scalars(fast),
                   "seconds": round(time.perf_counter() - t0, 1), "windows": windows, "options": extra,
                   "calibration": f"{n_calib} x 8 windows of {window - 1} train-split tokens"}


def _scalars(fast) -> dict:
    out = {}
    for g in ec.explain(fast).graphs:
        for p in g.passes:
            if p.name == "threshold_channels":
                out = {k: v for k, v in p.artifacts.items() if not isinstance(v, dict) or k == "target"}
    return record.jsonable(out)


def _method(r) -> str:
    """The method, with the targets when they are not the default ("all")."""
    targets = (r.get("options") or {}).get("targets")
    return r["method"] + (f" ({','.join(targets)})" if targets and list(targets) != ["all"] else "")


def table(path: str) -> str:
    """Markdown tables of a results JSONL: quality and achieved sparsity per model, method and target."""
    recs = [json.loads(line) for line in open(path)]
    out = []
    lm = [r for r in recs if r["model"] == "stdlib-lm"]
    if lm:
        dense = next((r["perplexity"] for r in lm if r["method"] == "eager"), None)
        out += [f"### stdlib-lm: held-out perplexity (dense {dense:.2f}), next-token agreement, achieved sparsity", "",
                "| method | target | perplexity | ppl ratio | next-token agree | achieved (weighted) | worst layer dev |",
                "|---|---|---|---|---|---|---|"]
        for r in lm:
            if r["method"] == "eager":
                continue
            a = r["achieved"]
            out.append(f"| {_method(r)} | {r['target']:.2f} | {r['perplexity']:.2f} | {r['perplexity'] / dense:.3f} | "
                       f"{r['next_token']:.3f} | {a['weighted']:.4f} | {a['max_abs_layer_deviation']:.3f} |")
        out.append("")
    mini = [r for r in recs if r["model"] == "minilm"]
    if mini:
        out += ["### MiniLM: embedding cosine vs eager, retrieval agreement, achieved sparsity", "",
                "| method | target | cosine mean | cosine min | top-1 agree | top-5 agree | achieved (weighted) | worst layer dev |",
                "|---|---|---|---|---|---|---|---|"]
        for r in mini:
            a, ra = r["achieved"], r["retrieval_agreement"]
            out.append(f"| {_method(r)} | {r['target']:.2f} | {r['cosine']['mean']:.4f} | {r['cosine']['min']:.4f} | "
                       f"{ra['top1']:.3f} | {ra['top5']:.3f} | {a['weighted']:.4f} | "
                       f"{a['max_abs_layer_deviation']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", action="store_true", help="print markdown tables of --out and exit")
    ap.add_argument("--models", default="minilm,stdlib-lm")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--greedy-batches", type=int, default=None,
                    help="calibration batches greedy scores on (default: the pass's, 4)")
    ap.add_argument("--greedy-metric", default=None, help="what greedy minimizes: cosine or mse (default: the pass's)")
    ap.add_argument("--keep-padding", action="store_true",
                    help="calibrate on padding positions too (skip_padding=False, the pass's behaviour before session 6)")
    ap.add_argument("--pass-targets", default=None,
                    help='ThresholdChannels.targets, comma-separated (default: the pass\'s, "all"); "all,head" adds the LM head')
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--docs", type=int, default=256)
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.out))
        return 0
    methods, targets = a.methods.split(","), [float(x) for x in a.targets.split(",")]
    greedy = {k: v for k, v in (("greedy_batches", a.greedy_batches), ("greedy_metric", a.greedy_metric)) if v is not None}
    meta = {"versions": record.versions(), "device": record.device_name("cpu"), "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg())}
    with open(a.out, "a") as f:
        for m in a.models.split(","):
            common = {"skip_padding": False} if a.keep_padding else {}
            if a.pass_targets:
                common["targets"] = tuple(a.pass_targets.split(","))
            cases = (minilm_cases(methods, targets, a.calib, a.queries, a.docs, greedy, common=common) if m == "minilm"
                     else lm_cases(methods, targets, a.calib, a.windows, greedy, common))
            for rec in cases:
                rec.update(meta)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                ach = rec.get("achieved", {}).get("weighted")
                q = rec.get("perplexity") or rec.get("cosine", {}).get("mean")
                print(f"{rec['model']:<10} {rec['method']:<8} s={rec['target']:.2f} quality={q:.4f} "
                      f"achieved={ach if ach is None else round(ach, 4)} ({rec.get('seconds')}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
