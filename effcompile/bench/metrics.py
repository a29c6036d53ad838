"""Quality metrics comparing an optimized model to eager: embeddings, retrieval, perplexity, tokens, logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from effcompile.bench.corpus import retrieval_set, stdlib_corpus  # noqa: F401  (re-exported helpers)

__all__ = [
    "compare_causal_lms", "compare_encoders", "embedding_cosine", "greedy_agreement", "logit_agreement", "logits_of", "mean_pool",
    "next_token_agreement", "perplexity", "perplexity_from_logits", "ranking_agreement",
    "retrieval_agreement", "retrieval_set", "sentence_embeddings", "stdlib_corpus", "unigram_perplexity",
]


# ----------------------------------------------------------------------------- output plumbing
def logits_of(out) -> torch.Tensor:
    """The logits (else the primary output) of a model output: tensor, HF ``ModelOutput``, dict or tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "to_tuple"):  # an HF ModelOutput without logits (BertModel, ViTModel): its first field
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__} output")


def _hidden_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "last_hidden_state" in out:
        return out["last_hidden_state"]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find a hidden state in a {type(out).__name__} output")


def _same_shape(ref: torch.Tensor, out: torch.Tensor, what: str) -> None:
    if ref.shape != out.shape:
        raise ValueError(f"{what}: shapes differ, reference {tuple(ref.shape)} vs optimized {tuple(out.shape)}")


# ----------------------------------------------------------------------------- embeddings, retrieval
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens (the sentence-transformers pooling MiniLM was trained with)."""
    if attention_mask is None:
        return hidden.mean(dim=-2)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(-2) / m.sum(-2).clamp_min(1e-9)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """L2-normalized mean-pooled embeddings of ``texts`` (float32, on CPU), batched."""
    chunks = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = _hidden_of(model(**dict(batch)))
        chunks.append(F.normalize(mean_pool(hidden.float(), batch["attention_mask"].to(hidden.device)), dim=-1).cpu())
    return torch.cat(chunks)


def embedding_cosine(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Per-row cosine between reference and optimized embeddings (last dim): mean and worst row."""
    _same_shape(ref, out, "embedding_cosine")
    cos = F.cosine_similarity(ref.float().flatten(0, -2), out.float().flatten(0, -2), dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item()}


def ranking_agreement(ref_scores: torch.Tensor, out_scores: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """How far the optimized model's rankings match eager's, for score matrices [queries, documents].

    ``top1``: fraction of queries whose best document is the same; ``top{k}``: mean |A∩B|/k of the two
    top-k sets (order inside the set ignored). Identical scores give 1.0 everywhere.
    """
    _same_shape(ref_scores, out_scores, "ranking_agreement")
    n_docs = ref_scores.shape[-1]
    res = {}
    for k in sorted(set(ks) | {1}):
        if not 1 <= k <= n_docs:
            raise ValueError(f"k={k} must be in [1, {n_docs}] (the number of documents)")
        a = ref_scores.topk(k, dim=-1).indices
        b = out_scores.topk(k, dim=-1).indices
        overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1) / k
        res[f"top{k}"] = overlap.mean().item()
    return res


def retrieval_agreement(ref_q: torch.Tensor, ref_d: torch.Tensor, out_q: torch.Tensor, out_d: torch.Tensor,
                        ks: Sequence[int] = (1, 5)) -> dict:
    """Rank documents for each query by cosine, with eager's and the optimized model's embeddings."""
    def scores(q, d):
        return F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T
    return ranking_agreement(scores(ref_q, ref_d), scores(out_q, out_d), ks)


def compare_encoders(ref_model, out_model, tokenizer, *, n_queries: int = 64, n_docs: int = 256,
                     seed: int = 0) -> dict:
    """Embedding cosine and retrieval agreement on real stdlib docstrings, plus eager's own recall@1."""
    queries, docs, answers = retrieval_set(n_queries, n_docs, seed)
    rq, rd = sentence_embeddings(ref_model, tokenizer, queries), sentence_embeddings(ref_model, tokenizer, docs)
    oq, od = sentence_embeddings(out_model, tokenizer, queries), sentence_embeddings(out_model, tokenizer, docs)
    hit = ((rq @ rd.T).argmax(-1) == torch.tensor(answers)).float().mean().item()
    return {"cosine": embedding_cosine(torch.cat([rq, rd]), torch.cat([oq, od])),
            "retrieval": retrieval_agreement(rq, rd, oq, od), "eager_recall@1": hit}


# ----------------------------------------------------------------------------- language modelling
def perplexity_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> float:
    """exp(mean NLL) where ``logits[..., i, :]`` scores ``targets[..., i]`` (already aligned, no shift)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not align with targets {tuple(targets.shape)}")
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=ignore_index, reduction="mean")
    return math.exp(nll.item())


def _windows(ids: torch.Tensor, window: int, max_windows: int | None) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = (ids.numel() - 1) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"need more than window={window} tokens, got {ids.numel()}")
    # Windows of window+1 tokens overlapping by one, so each token is predicted exactly once.
    return ids[: n * window + 1].unfold(0, window + 1, window)


@torch.no_grad()
def perplexity(model, ids, *, window: int = 128, batch_size: int = 8, max_windows: int | None = None) -> float:
    """Held-out perplexity of a causal LM over a 1-D token stream, in non-overlapping windows.

    Targets are ``ids[1 : n*window + 1]``; ``unigram_perplexity`` over the same targets is the baseline.
    """
    wins = _windows(ids, window, max_windows)
    device = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), torch.device("cpu"))
    total, count = 0.0, 0
    for i in range(0, wins.shape[0], batch_size):
        b = wins[i:i + batch_size].to(device)
        logits = logits_of(model(input_ids=b[:, :-1])).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        count += b[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train_ids, eval_ids, vocab_size: int, *, window: int | None = None,
                       max_windows: int | None = None) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on ``train_ids``, on ``eval_ids``' targets.

    With ``window`` given, scores exactly the targets ``perplexity(window=, max_windows=)`` scores.
    """
    counts = torch.bincount(torch.as_tensor(train_ids, dtype=torch.long).flatten(), minlength=vocab_size)
    if counts.numel() > vocab_size:
        raise ValueError(f"train_ids contain ids >= vocab_size={vocab_size}")
    logp = torch.log((counts.double() + 1) / (counts.sum() + vocab_size))
    if window is not None:
        targets = _windows(eval_ids, window, max_windows)[:, 1:].flatten()
    else:
        targets = torch.as_tensor(eval_ids, dtype=torch.long).flatten()
    return math.exp(-logp[targets].mean().item())


def next_token_agreement(ref_logits: torch.Tensor, out_logits: torch.Tensor,
                         mask: torch.Tensor | None = None) -> float:
    """Teacher-forced greedy agreement: fraction of positions where both models' argmax token match."""
    ref_logits, out_logits = logits_of(ref_logits), logits_of(out_logits)
    _same_shape(ref_logits, out_logits, "next_token_agreement")
    same = (ref_logits.argmax(-1) == out_logits.argmax(-1)).float()
    if mask is None:
        return same.mean().item()
    m = mask.to(same.dtype)
    return ((same * m).sum() / m.sum().clamp_min(1)).item()


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    # Full recompute each step (no KV cache): works for any drop-in replacement of the model's forward.
    for _ in range(steps):
        nxt = logits_of(model(input_ids=ids))[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
    return ids


def greedy_agreement(ref_model, out_model, prompts: torch.Tensor, max_new_tokens: int = 16) -> dict:
    """Free-running greedy decoding from the same prompts [batch, len] with both models.

    ``prefix``: mean fraction of new tokens generated before the first divergence;
    ``tokens``: mean positionwise match; ``exact``: fraction of prompts with identical continuations.
    """
    if prompts.dim() != 2:
        raise ValueError(f"prompts must be [batch, len] token ids, got shape {tuple(prompts.shape)}")
    n = prompts.shape[1]
    a = _greedy(ref_model, prompts, max_new_tokens)[:, n:].cpu()
    b = _greedy(out_model, prompts, max_new_tokens)[:, n:].cpu()
    same = a == b
    prefix = same.long().cumprod(dim=1).sum(1).float() / max_new_tokens
    return {"prefix": prefix.mean().item(), "tokens": same.float().mean().item(),
            "exact": same.all(1).float().mean().item()}


def logit_agreement(ref, out) -> dict[str, float]:
    """Cosine (per position, averaged), max |difference| and top-1 agreement of two logit tensors."""
    ref, out = logits_of(ref).float(), logits_of(out).float()
    _same_shape(ref, out, "logit_agreement")
    cos = F.cosine_similarity(ref.flatten(0, -2), out.flatten(0, -2), dim=-1)
    return {"cosine": cos.mean().item(), "min_cosine": cos.min().item(),
            "max_abs_diff": (ref - out).abs().max().item(),
            "top1": (ref.argmax(-1) == out.argmax(-1)).float().mean().item()}


def compare_causal_lms(ref_model, out_model, ids, *, window: int = 128, max_windows: int = 32,
                       n_prompts: int = 8, prompt_len: int = 32, max_new_tokens: int = 16) -> dict:
    """Perplexity of both, logit and next-token agreement on ``ids``, and greedy-decoding agreement."""
    wins = _windows(ids, window, max_windows)
    with torch.no_grad():
        ref = logits_of(ref_model(input_ids=wins[:8, :-1]))
        out = logits_of(out_model(input_ids=wins[:8, :-1]))
    prompts = wins[:n_prompts, :prompt_len]
    return {"perplexity_ref": perplexity(ref_model, ids, window=window, max_windows=max_windows),
            "perplexity_out": perplexity(out_model, ids, window=window, max_windows=max_windows),
            "logits": logit_agreement(ref, out), "next_token": next_token_agreement(ref, out),
            "greedy": greedy_agreement(ref_model, out_model, prompts, max_new_tokens)}

