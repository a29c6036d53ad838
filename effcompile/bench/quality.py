"""Quality of an optimized model against eager, by task: embedding retrieval, causal-LM perplexity, logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from effcompile.bench import metrics
from effcompile.bench.zoo import ZooModel, heldout_ids

if TYPE_CHECKING:
    from effcompile.bench.harness import BenchSettings

__all__ = ["DTYPES", "Caller", "context", "eager_reference", "measure_quality", "move", "quality_record", "to_cpu"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def move(x: Any, device: str, dtype: torch.dtype) -> Any:
    """A tensor on ``device``; floating tensors also cast to ``dtype`` (token ids stay integers)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    return x


def to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, dict):  # HF ModelOutput too: metrics read "logits" / "last_hidden_state" from a dict
        return {k: to_cpu(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, tuple | list):
        return type(out)(to_cpu(v) for v in out)
    return out


def context(model) -> int:
    """The model's maximum sequence length (positions)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 512))


class Caller:
    """The metrics build CPU inputs and read CPU outputs; this moves inputs to the device and outputs back."""

    def __init__(self, fn: Callable, s: BenchSettings, **extra):
        self.fn, self.device, self.dtype, self.extra = fn, s.device, DTYPES[s.dtype], extra

    def __call__(self, *args, **kwargs):
        args = tuple(move(a, self.device, self.dtype) for a in args)
        kwargs = {k: move(v, self.device, self.dtype) for k, v in kwargs.items()}
        out = self.fn(*args, **kwargs, **self.extra)
        return out if torch.device(self.device).type == "cpu" else to_cpu(out)


def quality_record(metric: str, higher_is_better: bool, base: float, optimized: float, details: dict) -> dict:
    """The headline metric of eager (base) and the optimized model; recovery > 1 means better than eager."""
    if higher_is_better:
        recovery = optimized / base if base else None
    else:
        recovery = base / optimized if optimized else None
    return {"metric": metric, "higher_is_better": higher_is_better, "base": base, "optimized": optimized,
            "recovery": recovery, "details": details}


def _embed_texts(fn, tok, s: BenchSettings):
    queries, docs, answers = metrics.retrieval_set(s.n_queries, s.n_docs, s.seed)
    q = metrics.sentence_embeddings(fn, tok, queries)
    d = metrics.sentence_embeddings(fn, tok, docs)
    recall = ((q @ d.T).argmax(-1) == torch.tensor(answers)).float().mean().item()
    return q, d, recall


def _lm_stream(zm: ZooModel, s: BenchSettings) -> tuple[torch.Tensor, int]:
    window = min(s.lm_window, context(zm.model) - 1)
    if zm.tokenizer is not None:
        return heldout_ids(zm.tokenizer), window
    # A random-init LM has no tokenizer or text: a deterministic random stream still measures agreement.
    ids = zm.make_inputs(batch=s.lm_windows + 1, seq=window, seed=s.seed + 1)["input_ids"].cpu()
    return ids.flatten(), window


def _has_text(zm: ZooModel) -> bool:
    return zm.task == "embedding" and zm.tokenizer is not None


def eager_reference(zm: ZooModel, s: BenchSettings, inputs: Callable[[], dict]) -> Any:
    """What the comparison needs from eager, computed once per model (a sweep reuses it).

    Embeddings are composed from the metrics' parts rather than ``compare_encoders`` so that eager's
    embeddings are computed once per sweep, not once per grid point.
    """
    if _has_text(zm):
        return _embed_texts(Caller(zm.model, s), zm.tokenizer, s)
    if zm.task == "causal-lm":
        return None  # compare_causal_lms runs eager itself: cheap next to compiling the optimized model
    with torch.no_grad():
        return to_cpu(metrics.logits_of(zm.model(**inputs())))


def measure_quality(zm: ZooModel, fn, reference: Any, s: BenchSettings, inputs: Callable[[], dict]) -> dict:
    """embedding: retrieval recall@1 (+ cosine, top-1/top-5 agreement); causal-lm: held-out perplexity
    (+ logit, next-token and greedy agreement); anything else: top-1 agreement of the logits."""
    if _has_text(zm):
        rq, rd, r_recall = reference
        oq, od, o_recall = _embed_texts(Caller(fn, s), zm.tokenizer, s)
        details = {"cosine": metrics.embedding_cosine(torch.cat([rq, rd]), torch.cat([oq, od])),
                   "retrieval_agreement": metrics.retrieval_agreement(rq, rd, oq, od),
                   "recall@1_eager": r_recall, "recall@1_optimized": o_recall,
                   "n_queries": s.n_queries, "n_docs": s.n_docs, "text": "stdlib docstrings"}
        return quality_record("recall@1", True, r_recall, o_recall, details)
    if zm.task == "causal-lm":
        ids, window = _lm_stream(zm, s)
        # use_cache=False: quality needs logits only, and no DynamicCache is built inside the graph.
        ref, out = Caller(zm.model, s, use_cache=False), Caller(fn, s, use_cache=False)
        details = metrics.compare_causal_lms(ref, out, ids, window=window, max_windows=s.lm_windows,
                                             prompt_len=min(32, window), max_new_tokens=s.new_tokens)
        details.update(window=window, windows=s.lm_windows,
                       text="stdlib held-out" if zm.tokenizer is not None else "random ids")
        return quality_record("perplexity", False, details["perplexity_ref"], details["perplexity_out"], details)
    with torch.no_grad():
        out = to_cpu(metrics.logits_of(fn(**inputs())))
    agree = metrics.logit_agreement(reference, out)
    # Base is eager against itself (agreement 1 by definition); optimized is the optimized model's agreement.
    return quality_record("top1_agreement", True, 1.0, agree["top1"], agree)
