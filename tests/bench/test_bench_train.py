"""The real trainer on a tiny budget: artifacts, manifest, hash verification, reload, deterministic retrain."""

import json

import pytest
import torch

from effcompile.bench import train_lm, zoo

TINY = dict(max_steps=20, batch_size=4, warmup_steps=5, eval_windows=8)


@pytest.mark.slow
def test_train_tiny_budget_then_verify_reload_and_retrain(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFCOMPILE_MODEL_DIR", str(tmp_path))
    path = train_lm.train(max_minutes=10, progress=False, **TINY)
    default, key = train_lm.default_dir(train_lm.TrainSettings(**TINY))
    assert path == default and path.name == f"stdlib-llama-{key}" and path.parent == tmp_path

    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))}, "no pickles"
    assert not list(tmp_path.glob(".*")), "no temp dirs left behind"

    manifest = train_lm.verify(path, key)
    assert json.loads((path / "manifest.json").read_text()) == manifest
    res, cfg = manifest["results"], json.loads((path / "config.json").read_text())
    assert res["steps"] == 20 and not res["stopped_early"] and res["tokens_seen"] == 20 * 4 * 128
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    vocab = manifest["model"]["vocab_size"]
    assert 1 < res["heldout_perplexity"] < vocab and 1 < res["unigram_perplexity"] < vocab
    assert manifest["data"]["heldout_files"] > 0 and manifest["settings"]["max_steps"] == 20

    # Cached and verified: the zoo loads it without training.
    def no_training(*a, **k):
        raise AssertionError("a verified cache must not be retrained")

    with monkeypatch.context() as m:
        m.setattr(train_lm, "train", no_training)
        model, tok = zoo.load_stdlib_lm(**TINY)
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], vocab)
    assert tok.decode(ids[0]) == "def add(a, b):\n    return a + b\n"  # byte-level BPE round-trips

    # A flipped byte is caught, warned about, and retrained -- to the very same weights (determinism).
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.warns(RuntimeWarning, match="does not match its sha256"):
        zoo.load_stdlib_lm(progress=False, **TINY)
    assert train_lm.verify(path, key)["weights_sha256"] == manifest["weights_sha256"]
