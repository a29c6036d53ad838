"""Self-speculative greedy decoding: draft with a skipped-layer copy of the model, verify with the full one."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

log = logging.getLogger("effcompile")

__all__ = ["DraftChoice", "SpecStats", "find_draft", "generate", "greedy_decode"]


@dataclass
class SpecStats:
    """What one ``generate`` call did: rounds, drafted/accepted tokens, forwards, wall time."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    draft_forwards: int = 0
    verify_forwards: int = 0
    seconds: float = 0.0
    draft_lengths: list[int] = field(default_factory=list)
    note: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / max(self.rounds, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "new_tokens": self.new_tokens,
                "tokens_per_round": self.tokens_per_round, "draft_forwards": self.draft_forwards,
                "verify_forwards": self.verify_forwards, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
                "note": self.note}


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _n_layers(model) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError("generate() needs a Hugging Face causal LM (model.config.num_hidden_layers)")
    return n


def _check_draft(model, draft):
    from effcompile.passes.skip_layers import SkipLayers

    if not isinstance(draft, SkipLayers) or not draft.layers:
        raise ValueError(f"draft= must be SkipLayers(layers=(...)) (an explicit skip set) or 'auto'; got {draft!r}")
    n = _n_layers(model)
    valid = [f"layers.{i}" for i in range(n)]
    bad = [x for x in draft.layers if int(x.split(".")[1]) >= n]
    if bad:
        raise ValueError(f"draft skip set names unknown layers {bad}; valid: {valid} (and their .attn/.ffn)")
    subs = {s for x in draft.layers for s in ([x] if x.count(".") == 2 else [f"{x}.attn", f"{x}.ffn"])}
    if len(subs) >= 2 * n:
        raise ValueError(f"draft skip set {list(draft.layers)} skips every layer; keep at least one of {valid}")
    return draft


def _set_length(cache, n: int) -> None:
    # Rollback: a static cache's entries past the length are masked out and overwritten by the next write.
    for layer in cache.layers:
        layer.cumulative_length.fill_(n)


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int, *, step=None,
                  eos_token_id: int | None = None) -> torch.Tensor:
    """Plain greedy decoding with a static KV cache, one token per forward (the baseline). ``step`` is the
    callable run per token (e.g. an effcompile'd model); the prompt is prefilled by it too."""
    step = step or model
    kw = _cache_kwarg(model)
    ids = input_ids.reshape(1, -1)
    cache = _static_cache(model, ids.shape[1] + max_new_tokens + 1)
    out = step(input_ids=ids, **{kw: cache}, use_cache=True)
    toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and int(toks[-1]) == eos_token_id:
            break
        out = step(input_ids=toks[-1], **{kw: cache}, use_cache=True)
        toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([ids, *toks], dim=1)


class SpeculativeDecoder:
    """A full (verify) and a skipped-layer (draft) compilation of one model sharing weights and a KV cache."""

    def __init__(self, model, draft, *, max_draft: int = 8, cache: bool = True):
        import effcompile as ec

        if isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 1:
            raise ValueError(f"max_draft={max_draft!r}: must be an int >= 1")
        self.model, self.draft_cfg, self.max_draft = model, _check_draft(model, draft), max_draft
        self.kw = _cache_kwarg(model)
        self.verify = ec.effcompile(model, cache=cache)
        self.draft = ec.effcompile(model, passes=[self.draft_cfg], cache=cache)

    @torch.no_grad()
    def generate_one(self, ids: torch.Tensor, max_new_tokens: int, stats: SpecStats,
                     eos_token_id: int | None = None) -> torch.Tensor:
        ids = ids.reshape(1, -1)
        plen = ids.shape[1]
        cache = _static_cache(self.model, plen + max_new_tokens + self.max_draft + 2)
        kw = {self.kw: cache, "use_cache": True}
        t0 = time.perf_counter()
        out = self.verify(input_ids=ids, **kw)
        stats.verify_forwards += 1
        last = out.logits[:, -1].argmax(-1, keepdim=True)  # decided, not yet in the cache
        new = [last]
        length, k = plen, min(4, self.max_draft)  # cache length: positions [0, length) hold the full model's KV
        while len(new) < max_new_tokens and (eos_token_id is None or int(new[-1]) != eos_token_id):
            k = min(k, max_new_tokens - len(new))
            drafts, tok = [], last
            for _ in range(k):  # draft: the skipped-layer model writes KV only for the layers it runs
                tok = self.draft(input_ids=tok, **kw).logits[:, -1].argmax(-1, keepdim=True)
                drafts.append(tok)
            stats.draft_forwards += k
            _set_length(cache, length)  # roll back: verify rewrites these positions in every layer
            block = torch.cat([last, *drafts], dim=1)
            target = self.verify(input_ids=block, **kw).logits[0].argmax(-1)  # k + 1 predictions
            stats.verify_forwards += 1
            d = block[0, 1:]
            n = int((d == target[:k]).long().cumprod(0).sum())
            accepted = [t.view(1, 1) for t in d[:n]] + [target[n].view(1, 1)]  # + the full model's next token
            new.extend(accepted)
            length += n + 1  # last and the n accepted drafts are now cached with full-model KV
            _set_length(cache, length)
            last = accepted[-1]
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += n
            stats.draft_lengths.append(k)
            # Adaptive draft length (as HF's assisted generation): grow after a fully accepted round, else shrink.
            k = min(k + 2, self.max_draft) if n == k else max(1, k - 1)
        new = new[:max_new_tokens]
        if eos_token_id is not None:
            hit = [i for i, t in enumerate(new) if int(t) == eos_token_id]
            new = new[: hit[0] + 1] if hit else new
        stats.seconds += time.perf_counter() - t0
        stats.new_tokens += len(new)
        return torch.cat([ids, *new], dim=1)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder(model, draft, max_draft: int, cache: bool) -> SpeculativeDecoder:
    """One decoder per (model, draft, max_draft): its compiled draft and verify are reused across calls,
    so repeated generate() calls do not pile up dynamo cache entries (and hit its recompile limit)."""
    per_model = _DECODERS.setdefault(model, {})
    key = (draft, max_draft, cache)
    if key not in per_model:
        per_model[key] = SpeculativeDecoder(model, draft, max_draft=max_draft, cache=cache)
    return per_model[key]


def generate(model, input_ids: torch.Tensor, *, max_new_tokens: int = 32, draft="auto", calibration=None,
             max_draft: int = 8, eos_token_id: int | None = None, cache: bool = True,
             return_stats: bool = False):
    """Greedy decoding of a Hugging Face causal LM, sped up by self-speculation; lossless.

    A draft (the same weights under the skip set ``draft``, compiled with ``SkipLayers``) proposes up
    to ``max_draft`` tokens one at a time; the full model checks them all in one forward and keeps the
    longest prefix it agrees with plus its own next token, so the output is the full model's greedy
    continuation. Both share one static KV cache: drafting writes the kept layers' KV, and the cache
    is rolled back to the last verified position before each verify, which rewrites every layer.

    Args:
        input_ids: [len] or [batch, len] prompt ids; rows are decoded one after another (acceptance is
            per sequence).
        draft: ``SkipLayers(layers=...)``, or "auto" to search one with :func:`find_draft` on
            ``calibration`` (a 1-D tensor of token ids, or [n, len]).
        return_stats: also return a :class:`SpecStats` (acceptance rate, tokens/s, forwards).

    Returns ``[batch, len + max_new_tokens]`` ids (rows that hit ``eos_token_id`` are padded with it).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if isinstance(draft, str):
        if draft != "auto":
            raise ValueError(f"draft={draft!r}: give 'auto' or SkipLayers(layers=(...))")
        if calibration is None:
            raise ValueError("draft='auto' searches a skip set on calibration=: give token ids of real text")
        choice = find_draft(model, calibration, max_draft=max_draft)
        draft = choice.config if choice.expected_speedup > 1.0 else None
    stats = SpecStats()
    rows = input_ids.reshape(-1, input_ids.shape[-1])
    if draft is None:  # nothing expected to pay off: plain greedy decoding, said in the stats
        import effcompile as ec

        full, t0 = ec.effcompile(model, cache=cache), time.perf_counter()
        outs = [greedy_decode(model, r, max_new_tokens, step=full, eos_token_id=eos_token_id) for r in rows]
        stats.seconds, stats.note = time.perf_counter() - t0, "no draft expected to pay off: plain greedy decoding"
        stats.new_tokens = sum(o.shape[1] - rows.shape[1] for o in outs)
    else:
        dec = _decoder(model, draft, max_draft, cache)
        outs = [dec.generate_one(r, max_new_tokens, stats, eos_token_id) for r in rows]
    width = max(o.shape[1] for o in outs)
    pad = eos_token_id if eos_token_id is not None else 0
    out = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs])
    return (out, stats) if return_stats else out


# ----------------------------------------------------------------------------- choosing the skip set
@dataclass
class DraftChoice:
    """The skip set chosen for drafting and how it was scored (all on calibration text)."""

    config: object  # SkipLayers(layers=...)
    agreement: float  # teacher-forced next-token agreement of draft and full model
    cost: float  # draft forward cost relative to the full model (FLOP estimate)
    expected_speedup: float
    draft_length: int
    trace: list[dict] = field(default_factory=list)  # every accepted search step


def expected_speedup(alpha: float, cost: float, max_draft: int) -> tuple[float, int]:
    """Best (speedup, k >= 1) for i.i.d. acceptance ``alpha``: E[tokens per round] / (k drafts + 1 verify),
    in units of one full forward (a verify over k + 1 tokens costs about one decode step when memory-bound)."""
    best = (0.0, 1)
    for k in range(1, max_draft + 1):
        tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
        best = max(best, (tokens / (k * cost + 1.0), k))
    return best


@torch.no_grad()
def find_draft(model, calibration, *, max_draft: int = 8, max_skip: float = 0.75) -> DraftChoice:
    """Greedy search (SWIFT / Draft & Verify style) of attn/ffn sublayers to skip in the draft.

    Each step adds the sublayer that maximises the expected speedup, estimated from the teacher-forced
    agreement of the draft's and the full model's next-token argmax on ``calibration`` ids and from
    the draft's FLOP share; it stops when no sublayer improves it (or ``max_skip`` of them are gone).
    """
    from effcompile.compiler import ir
    from effcompile.passes import skip_layers as sk

    ids = torch.as_tensor(calibration, dtype=torch.long)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(input_ids=ids, use_cache=False)
    gm, args = graphs[0]
    ir.annotate(gm, args)
    units, _ = sk.find_units(gm)
    total = sk.total_flops(gm)
    ref = gm(*args)[0].argmax(-1)
    names = sorted(units, key=lambda u: (units[u].block, u))

    def score(subs):
        logits = sk._trial(gm, units, subs)(*args)[0]
        alpha = (logits.argmax(-1) == ref).float().mean().item()
        cost = 1.0 - sum(units[s].flops for s in subs) / total
        sp, k = expected_speedup(alpha, cost, max_draft)
        return {"skip": list(subs), "agreement": alpha, "cost": cost, "expected_speedup": sp, "k": k}

    chosen, best, trace = [], None, []
    while len(chosen) < max(1, int(max_skip * len(names))):
        trials = [score([*chosen, c]) for c in names if c not in chosen]
        top = max(trials, key=lambda t: t["expected_speedup"])
        if best is not None and top["expected_speedup"] <= best["expected_speedup"]:
            break
        chosen, best = top["skip"], top
        trace.append(top)
    if best["expected_speedup"] <= 1.0:
        # Shallow models: every layer matters, so no draft pays for itself. The best one is still
        # returned (callers can measure it); generate(draft="auto") then decodes without drafting.
        log.warning("effcompile: no draft skip set is expected to speed decoding up (best %s: agreement %.3f, "
                    "cost %.2f, expected %.2fx)", best["skip"], best["agreement"], best["cost"],
                    best["expected_speedup"])
    from effcompile.passes.skip_layers import SkipLayers

    cfg = SkipLayers(layers=tuple(chosen))
    log.info("effcompile: draft skip set %s (agreement %.3f, cost %.2f, expected %.2fx)", chosen,
             best["agreement"], best["cost"], best["expected_speedup"])
    return DraftChoice(cfg, best["agreement"], best["cost"], best["expected_speedup"], best["k"], trace)
