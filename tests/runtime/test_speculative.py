"""Self-speculative decoding: lossless against plain greedy decoding, stats, draft search, bad inputs."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.compiler.speculative import (
    SpecStats,
    SpeculativeDecoder,
    expected_speedup,
    find_draft,
    greedy_decode,
)


@pytest.fixture(scope="module")
def lm():
    """The stdlib LM (trained here on real text, cached) and held-out token ids."""
    from effcompile.bench.zoo import heldout_ids, load_stdlib_lm

    # Trains on a fresh machine if no other test did first (test order across xdist workers is not fixed); a
    # worker training it already holds the model's lock, so this one waits and loads.
    model, tok = load_stdlib_lm()
    return model, heldout_ids(tok)


@pytest.fixture(autouse=True)
def _room_for_variants():
    # Draft, verify and the plain baseline are three compilations of one forward, each with a prefill,
    # a decode and a multi-token variant: more than dynamo's default 8 entries per code object.
    with torch._dynamo.config.patch(recompile_limit=32):
        yield


def _prompts(ids, n, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g).tolist()
    return [ids[s:s + length] for s in starts]


def _lossless(model, ids, n, new_tokens):
    dec = SpeculativeDecoder(model, ec.SkipLayers(layers=("layers.2.ffn", "layers.3.attn")), max_draft=6, cache=False)
    stats = SpecStats()
    different = []
    for i, p in enumerate(_prompts(ids, n)):
        got = dec.generate_one(p, new_tokens, stats)
        ref = greedy_decode(model, p, new_tokens)  # eager HF forward, one token per step, static cache
        if not torch.equal(got, ref):
            different.append(i)
    assert not different, f"speculative output differs from greedy decoding for prompts {different}"
    assert stats.new_tokens == n * new_tokens and 0 < stats.accepted <= stats.drafted
    assert stats.verify_forwards == stats.rounds + n  # one verify per round + each prompt's prefill
    assert 0.2 < stats.acceptance_rate < 1.0 and len(set(stats.draft_lengths)) > 1  # the length adapts


@pytest.mark.slow  # ~60 s on a quiet 2-core CPU (400 s under load 9)
def test_lossless_over_50_prompts(lm):
    _lossless(*lm, n=50, new_tokens=12)


def test_lossless_quick(lm):
    _lossless(*lm, n=6, new_tokens=12)


def test_plain_baseline_is_hf_greedy(lm):
    model, ids = lm
    p = _prompts(ids, 1, seed=3)[0]
    hf = model.generate(p.view(1, -1), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(greedy_decode(model, p, 10), hf)


def test_generate_batches_rows_and_reports_stats(lm):
    model, ids = lm
    prompts = torch.stack(_prompts(ids, 3, seed=1))
    out, stats = ec.generate(model, prompts, max_new_tokens=8, draft=ec.SkipLayers(layers=("layers.2",)),
                             return_stats=True, cache=False)
    assert out.shape == (3, prompts.shape[1] + 8)
    for row, p in zip(out, prompts, strict=True):
        assert torch.equal(row.view(1, -1), greedy_decode(model, p, 8))
    d = stats.as_dict()
    assert d["new_tokens"] == 24 and 0 <= d["acceptance_rate"] <= 1 and d["tokens_per_s"] > 0


def test_draft_search_scores_agreement_against_cost(lm):
    model, ids = lm
    choice = find_draft(model, ids[:4 * 64].reshape(4, 64), max_draft=6)
    assert choice.config.layers and 0 < choice.agreement <= 1 and 0 < choice.cost < 1
    speeds = [t["expected_speedup"] for t in choice.trace]
    assert speeds == sorted(speeds) and choice.expected_speedup == speeds[-1]
    out = ec.generate(model, ids[5000:5020], max_new_tokens=6, draft="auto", calibration=ids[:256], cache=False)
    assert torch.equal(out, greedy_decode(model, ids[5000:5020], 6))  # drafting or not, lossless


def test_expected_speedup_model():
    assert expected_speedup(1.0, 0.5, 4) == pytest.approx((5 / 3, 4))  # all accepted: k + 1 tokens / (k c + 1)
    sp, k = expected_speedup(0.0, 0.5, 4)
    assert (sp, k) == pytest.approx((1 / 1.5, 1))  # nothing accepted: a bonus token per draft + verify
    assert expected_speedup(0.8, 0.9, 8)[0] < 1 < expected_speedup(0.8, 0.3, 8)[0]


@pytest.mark.parametrize("draft,match", [
    (ec.SkipLayers(layers=("layers.7",)), r"unknown layers \['layers.7'\]; valid: \['layers.0', 'layers.1'"),
    (ec.SkipLayers(layers=("layers.0", "layers.1", "layers.2", "layers.3")), "skips every layer"),
    (ec.SkipLayers(num=1), "explicit skip set"),
    ("best", "give 'auto' or SkipLayers"),
])
def test_bad_drafts_name_what_is_valid(lm, draft, match):
    model, ids = lm
    with pytest.raises(ValueError, match=match):
        ec.generate(model, ids[:8], max_new_tokens=4, draft=draft)


def test_bad_arguments(lm):
    model, ids = lm
    with pytest.raises(ValueError, match="max_new_tokens"):
        ec.generate(model, ids[:8], max_new_tokens=0, draft=ec.SkipLayers(layers=("layers.1",)))
    with pytest.raises(ValueError, match="max_draft"):
        ec.generate(model, ids[:8], max_draft=0, draft=ec.SkipLayers(layers=("layers.1",)))
    with pytest.raises(ValueError, match="calibration="):
        ec.generate(model, ids[:8], draft="auto")
