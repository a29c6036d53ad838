"""SmoothQuant-style smoothing: MiniLM embedding cosine of W8A8 / FP8 x FP8 / MXINT8 x int8, with and without.

Calibration: 32 stdlib docstrings (4 batches of 8); evaluation: 32 other docstrings, mean-pooled
embeddings against eager fp32. Writes benchmarks/results/smoothing-cpu-<date>.json.

    python benchmarks/smoothing.py
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import effcompile as ec
from effcompile.bench import corpus
from effcompile.testing import load_minilm

CASES = [("int8", "int8"), ("mxint8", "int8"), ("fp8", "fp8")]
ALPHAS = [None, 0.5, 0.8]


class MiniLMEval:
    """Real MiniLM, 4 calibration batches of 8 stdlib docstrings, and a held-out batch of 32 with its eager
    mean-pooled embeddings; ``cosine(fn)`` compares a compiled model's embeddings to them."""

    def __init__(self):
        self.model, tok = load_minilm()
        texts = corpus.stdlib_corpus(64, seed=1)
        self.calib = [dict(tok(texts[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 32, 8)]
        self.batch = dict(tok(corpus.stdlib_corpus(32, seed=5), padding=True, return_tensors="pt"))
        self.ref = self.embed(self.model)

    def embed(self, fn) -> torch.Tensor:
        with torch.no_grad():
            h = fn(**self.batch).last_hidden_state
        m = self.batch["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    def cosine(self, fn) -> torch.Tensor:
        return F.cosine_similarity(self.ref, self.embed(fn))


def main() -> None:
    ev = MiniLMEval()
    rows = []
    for weights, act in CASES:
        for alpha in ALPHAS:
            torch._dynamo.reset()
            cfg = ec.Quantize(weights=weights, activations=act, smooth=alpha)
            fast = ec.effcompile(ev.model, passes=[cfg], calibration=ev.calib if alpha is not None else None,
                                 cache=False)
            cos = ev.cosine(fast)
            rows.append({"weights": weights, "activations": act, "smooth": alpha,
                         "cosine_min": round(cos.min().item(), 6), "cosine_mean": round(cos.mean().item(), 6)})
            print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / f"smoothing-cpu-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"benchmark": "smoothing", "model": "minilm", "torch": torch.__version__,
                               "calibration": "32 stdlib docstrings (seed 1)", "eval": "32 docstrings (seed 5)",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
