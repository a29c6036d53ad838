"""Known-answer tests for the quality metrics (no training: tiny random models and synthetic logits)."""

import math

import pytest
import torch

from effcompile.bench import metrics as M
from effcompile.testing import tiny_hf


class Uniform(torch.nn.Module):
    """A causal LM that predicts every token with probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


class Oracle(torch.nn.Module):
    """Predicts (t + 1) % V after token t with near-certainty: perfect on an arange stream."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return 100.0 * torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", seed=0)


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("vocab", [2, 50, 1000])
def test_uniform_lm_perplexity_is_vocab_size(vocab):
    targets = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(0))
    assert M.perplexity_from_logits(torch.zeros(3, 17, vocab), targets) == pytest.approx(vocab, rel=1e-5)
    ids = torch.randint(0, vocab, (200,), generator=torch.Generator().manual_seed(1))
    assert M.perplexity(Uniform(vocab), ids, window=16) == pytest.approx(vocab, rel=1e-5)


def test_one_hot_correct_lm_perplexity_is_one():
    targets = torch.randint(0, 30, (2, 9))
    logits = 100.0 * torch.nn.functional.one_hot(targets, 30).float()
    assert M.perplexity_from_logits(logits, targets) == pytest.approx(1.0, abs=1e-6)
    assert M.perplexity(Oracle(30), torch.arange(301) % 30, window=20, batch_size=4) == pytest.approx(1.0, abs=1e-6)
    # Always wrong with the same confidence: perplexity explodes (exp(100)).
    assert M.perplexity_from_logits(logits, (targets + 1) % 30) > 1e40


def test_perplexity_windows_and_errors():
    with pytest.raises(ValueError, match="window=16"):
        M.perplexity(Uniform(5), torch.arange(10) % 5, window=16)
    with pytest.raises(ValueError, match="align"):
        M.perplexity_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    # max_windows caps the work and the scored targets exactly.
    assert M.perplexity(Oracle(7), torch.arange(1000) % 7, window=8, max_windows=3) == pytest.approx(1.0, abs=1e-6)


def test_unigram_perplexity_known_answers():
    vocab = 8
    balanced = torch.arange(800) % vocab  # every token equally frequent -> uniform unigram -> perplexity V
    assert M.unigram_perplexity(balanced, balanced, vocab) == pytest.approx(vocab, rel=1e-9)
    # Trained on one token only: add-one smoothing gives it (n+1)/(n+V).
    n = 992
    ones = torch.zeros(n, dtype=torch.long)
    assert M.unigram_perplexity(ones, ones[:10], vocab) == pytest.approx((n + vocab) / (n + 1), rel=1e-9)
    # With window=, it scores the same targets perplexity() scores.
    assert M.unigram_perplexity(balanced, balanced, vocab, window=10, max_windows=2) == pytest.approx(vocab)
    with pytest.raises(ValueError, match="vocab_size=4"):
        M.unigram_perplexity(torch.tensor([5]), torch.tensor([1]), 4)


def test_random_llama_is_near_uniform(llama):
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    ppl = M.perplexity(llama, ids, window=64)
    assert 64 < ppl < 256  # an untrained LM knows nothing: close to V = 128


# ----------------------------------------------------------------------------- embeddings / retrieval
def test_identical_embeddings_cosine_one_and_full_agreement():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(20, 32, generator=g), torch.randn(100, 32, generator=g)
    cos = M.embedding_cosine(q, q.clone())
    assert cos["mean"] == pytest.approx(1.0, abs=1e-6) and cos["min"] == pytest.approx(1.0, abs=1e-6)
    assert M.retrieval_agreement(q, d, q.clone(), d.clone()) == {"top1": 1.0, "top5": 1.0}
    assert M.embedding_cosine(q, -q)["mean"] == pytest.approx(-1.0, abs=1e-6)
    # Scaling embeddings changes neither cosine nor rankings.
    assert M.retrieval_agreement(q, d, 3 * q, 0.5 * d) == {"top1": 1.0, "top5": 1.0}


def test_shuffled_ranking_low_agreement():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 500, generator=g)
    shuffled = scores[:, torch.randperm(500, generator=g)]
    agree = M.ranking_agreement(scores, shuffled, ks=(1, 5, 50))
    # Chance levels: top1 = 1/500, top-k overlap = k/500.
    assert agree["top1"] < 0.03 and agree["top5"] < 0.05 and agree["top50"] < 0.2
    # A small perturbation keeps most of the ranking.
    near = M.ranking_agreement(scores, scores + 0.01 * torch.randn(200, 500, generator=g))
    assert near["top1"] > 0.9 and near["top5"] > 0.9


def test_ranking_agreement_partial_overlap_is_exact():
    ref = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    out = torch.tensor([[5.0, 4, 0, 0, 0, 3]])  # top-3: {0,1,2} vs {0,1,5}
    assert M.ranking_agreement(ref, out, ks=(3,)) == {"top1": 1.0, "top3": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="k=7"):
        M.ranking_agreement(ref, out, ks=(7,))
    with pytest.raises(ValueError, match="shapes differ"):
        M.ranking_agreement(ref, out[:, :5])


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 1], [3, 3], [100, 100]]])
    assert torch.equal(M.mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 2]]))


# ----------------------------------------------------------------------------- logits / tokens
def test_logit_and_next_token_agreement(llama):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = llama(input_ids=ids)
    same = M.logit_agreement(out, out.logits.clone())
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["max_abs_diff"] == 0 and same["top1"] == 1
    assert M.next_token_agreement(out, out.logits.clone()) == 1.0
    flipped = M.logit_agreement(out.logits, -out.logits)
    assert flipped["cosine"] == pytest.approx(-1.0, abs=1e-6) and flipped["top1"] < 0.1
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1
    assert M.next_token_agreement(out.logits, out.logits, mask) == 1.0


def test_greedy_agreement(llama):
    prompts = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    assert M.greedy_agreement(llama, llama, prompts, max_new_tokens=4) == {"prefix": 1.0, "tokens": 1.0, "exact": 1.0}
    other = M.greedy_agreement(llama, Uniform(128), prompts, max_new_tokens=4)  # always emits token 0
    assert other["exact"] < 1.0 and 0.0 <= other["prefix"] <= other["tokens"] <= 1.0
    with pytest.raises(ValueError, match="prompts"):
        M.greedy_agreement(llama, llama, prompts[0])


def test_logits_of_shapes():
    t = torch.ones(2)
    assert M.logits_of(t) is t and M.logits_of({"logits": t}) is t and M.logits_of((t, None)) is t
    bert = tiny_hf("bert")
    out = bert(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert M.logits_of(out) is out.last_hidden_state  # ModelOutput without logits: first field
    with pytest.raises(TypeError, match="str"):
        M.logits_of("nope")


def test_compare_causal_lms_self(llama):
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    r = M.compare_causal_lms(llama, llama, ids, window=32, max_windows=2, n_prompts=2, prompt_len=8, max_new_tokens=2)
    assert r["perplexity_ref"] == r["perplexity_out"] and math.isfinite(r["perplexity_ref"])
    assert r["next_token"] == 1.0 and r["greedy"]["exact"] == 1.0 and r["logits"]["max_abs_diff"] == 0


def test_compare_encoders_real_minilm(minilm):
    model, tok = minilm
    r = M.compare_encoders(model, model, tok, n_queries=8, n_docs=16)
    assert r["cosine"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert r["retrieval"] == {"top1": 1.0, "top5": 1.0}
    # Real weights: a docstring's first sentence finds the rest of it far above chance (1/16).
    assert r["eager_recall@1"] >= 0.25
