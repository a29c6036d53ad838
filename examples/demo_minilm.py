"""Demo: compile the real MiniLM-L6 sentence encoder with effcompile and compare it to eager.

Prints output agreement (embedding cosine, max |diff|), latency of eager vs effcompile vs
torch.compile(backend="effcompile"), and what explain() reports. CPU is fine: without a GPU (and
without TRITON_INTERPRET=1) no Triton kernel can run, so the row ops stay torch ops, and explain() says so.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch

import effcompile as ec
from effcompile.testing import load_minilm


def stdlib_texts(n: int) -> list[str]:
    """Real English text that every Python install has: the first paragraph of stdlib docstrings."""
    import collections
    import json
    import os
    import pathlib
    import re
    import textwrap

    texts = []
    for mod in (os, re, json, collections, pathlib, textwrap, inspect, statistics):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 40:
                texts.append(doc.split("\n\n")[0].replace("\n", " "))
    return sorted(set(texts))[:n]


def embed(model, batch):
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1)  # sentence-transformers mean pooling
    return torch.nn.functional.normalize(pooled, dim=-1)


def median_ms(fn, batch, reps=10):
    with torch.no_grad():
        fn(**batch)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(**batch)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_minilm()
    texts = stdlib_texts(8)
    batch = dict(tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    print(f"MiniLM-L6 (real weights), batch {tuple(batch['input_ids'].shape)} of stdlib docstrings")

    t0 = time.perf_counter()
    fast = ec.effcompile(model)
    with torch.no_grad():
        ref = embed(model, batch)
        got = embed(fast, batch)
    first_call = time.perf_counter() - t0
    backend = torch.compile(model, backend="effcompile")
    with torch.no_grad():
        got_backend = embed(backend, batch)

    for name, emb in (("effcompile(model)", got), ('torch.compile(backend="effcompile")', got_backend)):
        cos = torch.nn.functional.cosine_similarity(ref, emb).min().item()
        diff = (ref - emb).abs().max().item()
        print(f"{name:<38} min cosine to eager {cos:.7f}   max |diff| {diff:.2e}")

    print(f"\nfirst call (capture + passes + codegen, or cache load): {first_call:.2f} s")
    eager_ms, fast_ms = median_ms(model, batch), median_ms(fast, batch)
    print(f"latency  eager {eager_ms:.1f} ms   effcompile {fast_ms:.1f} ms   ratio {eager_ms / fast_ms:.2f}x")
    print("\n" + str(ec.explain(fast)))


if __name__ == "__main__":
    main()
