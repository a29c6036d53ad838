"""Model zoo: registry, random configs at every size, and the stdlib-LM cache's verification (no training)."""

import json
import threading
import time

import pytest
import torch

from effcompile.bench import train_lm, zoo
from effcompile.testing import tiny_hf


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gpt5'") as e:
        zoo.get_model("gpt5")
    for name in ("minilm", "stdlib-lm", "llama-small", "vit-1b"):
        assert name in str(e.value)


def test_registry_names():
    assert {"minilm", "stdlib-lm", "llama-small"} <= set(zoo.MODELS)
    assert {f"{k}-{s}" for k in zoo.KINDS for s in zoo.SIZES} <= set(zoo.MODELS)
    assert all(spec.name == name for name, spec in zoo.MODELS.items())


@pytest.mark.parametrize("kind", zoo.KINDS)
def test_random_tiny_models_run_and_are_deterministic(kind):
    state = torch.random.get_rng_state()
    model, make_inputs = zoo.random_model(kind, "tiny", seed=1)
    assert torch.equal(state, torch.random.get_rng_state()), "random_model must not move the global RNG"
    again, _ = zoo.random_model(kind, "tiny", seed=1)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    inputs = make_inputs(batch=2, seed=5)
    assert all(torch.equal(v, make_inputs(batch=2, seed=5)[k]) for k, v in inputs.items())
    with torch.no_grad():
        out = model(**inputs)
    assert next(iter(out.values())).shape[0] == 2
    assert not model.training


def test_llama_small_via_registry():
    m = zoo.get_model("llama-small")
    assert m.task == "causal-lm" and m.model.config.num_key_value_heads < m.model.config.num_attention_heads
    with torch.no_grad():
        logits = m.model(**m.make_inputs(batch=1, seq=16)).logits
    assert logits.shape == (1, 16, m.model.config.vocab_size)


@pytest.mark.parametrize("kind", zoo.KINDS)
def test_sizes_grow_and_1b_is_about_a_billion(kind):
    counts = []
    for size in zoo.SIZES:
        cfg = zoo.random_config(kind, size)
        with torch.device("meta"):  # count parameters without allocating 4 GB
            model = zoo._model_class(kind)(cfg)
        counts.append(sum(p.numel() for p in model.parameters()))
    assert counts == sorted(counts)
    assert 0.9e9 < counts[-1] < 1.5e9, counts


def test_bad_kind_size_and_inputs():
    with pytest.raises(ValueError, match="kind='t5'"):
        zoo.random_model("t5")
    with pytest.raises(ValueError, match="size='huge'"):
        zoo.random_config("llama", "huge")
    _, make_inputs = zoo.random_model("gpt2", "tiny")
    with pytest.raises(ValueError, match="seq=100000"):
        make_inputs(seq=100000)
    _, make_vit = zoo.random_model("vit", "tiny")
    with pytest.raises(ValueError, match="seq=8"):
        make_vit(seq=8)


# ----------------------------------------------------------------------------- stdlib-LM cache logic
def _fake_artifact(path, key):
    """A stdlib-lm-shaped directory (tiny random Llama + tiny BPE) with a valid manifest."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tiny_hf("llama").save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x):\n    return x\n"] * 3, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=[train_lm.EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    return train_lm.write_manifest(path, key, {"results": {}})


def test_cache_verify_load_and_rejections(tmp_path):
    good = tmp_path / "m"
    manifest = _fake_artifact(good, "k1")
    assert train_lm.verify(good, "k1")["weights_sha256"] == manifest["files"]["model.safetensors"]
    model, tok = train_lm.load(good, "k1")
    assert isinstance(model, torch.nn.Module) and tok("def f")["input_ids"]
    with pytest.raises(train_lm.CacheError, match="expected 'k2'"):
        train_lm.verify(good, "k2")
    blob = bytearray((good / "model.safetensors").read_bytes())
    blob[-1] ^= 1  # one flipped bit in the weights
    (good / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(train_lm.CacheError, match="model.safetensors does not match"):
        train_lm.verify(good, "k1")
    (good / "manifest.json").write_text("{not json")
    with pytest.raises(train_lm.CacheError, match="unreadable"):
        train_lm.verify(good)
    with pytest.raises(train_lm.CacheError, match="no manifest"):
        train_lm.verify(tmp_path / "absent")


def test_corrupt_cache_retrains_with_warning(tmp_path, monkeypatch):
    path = tmp_path / "m"
    _fake_artifact(path, "wrong-key")
    calls = []

    def fake_train(out, **kw):  # stands in for the 10-minute training: records and writes a valid artifact
        calls.append((out, kw))
        (out / "manifest.json").unlink()
        _fake_artifact(out, train_lm.default_dir(train_lm.TrainSettings(max_steps=3))[1])
        return out

    monkeypatch.setattr(train_lm, "train", fake_train)
    with pytest.warns(RuntimeWarning, match="rejected"):
        model, _ = zoo.load_stdlib_lm(path, max_steps=3, progress=False)
    assert len(calls) == 1 and calls[0][1]["max_steps"] == 3
    zoo.load_stdlib_lm(path, max_steps=3)  # now verified: no second training
    assert len(calls) == 1
    with pytest.raises(train_lm.CacheError):
        zoo.load_stdlib_lm(tmp_path / "none", train_if_missing=False)


def test_concurrent_loads_train_once_and_all_get_the_model(tmp_path, monkeypatch):
    # Two callers at once on an empty cache (CI's two xdist workers): one trains while the other waits on the lock,
    # then loads the verified artifact. Without the lock both trained, or a caller that may not train found nothing.
    path = tmp_path / "m"
    key = train_lm.default_dir(train_lm.TrainSettings(max_steps=3))[1]
    calls, started = [], threading.Event()

    def slow_train(out, **kw):
        calls.append(out)
        started.set()
        time.sleep(0.5)  # long enough for the other caller to arrive mid-training
        _fake_artifact(out, key)
        return out

    monkeypatch.setattr(train_lm, "train", slow_train)
    got = {}

    def load(name, **kw):
        got[name] = zoo.load_stdlib_lm(path, max_steps=3, progress=False, **kw)[0]

    trainer = threading.Thread(target=load, args=("trainer",))
    trainer.start()
    assert started.wait(30)
    load("reader", train_if_missing=False)  # arrives mid-training: waits, then loads
    trainer.join()
    assert len(calls) == 1 and all(isinstance(m, torch.nn.Module) for m in got.values()) and len(got) == 2


def test_a_valid_model_loads_without_the_lock_and_an_unwritable_dir_says_what_to_do(tmp_path, monkeypatch):
    # A read-only models directory (a shared or carried cache; the dev box runs as root, so the lock's failure to
    # be created is simulated): a verified model loads without taking the lock, a missing one names the way out.
    class Unwritable:
        def __init__(self, path):
            self.path = path

        def acquire(self):
            raise PermissionError(13, "Permission denied", self.path)

    monkeypatch.setattr(zoo, "FileLock", Unwritable)
    monkeypatch.setattr(train_lm, "train", lambda *a, **k: pytest.fail("nothing may train here"))
    path = tmp_path / "m"
    _fake_artifact(path, train_lm.default_dir(train_lm.TrainSettings(max_steps=3))[1])
    model, _ = zoo.load_stdlib_lm(path, max_steps=3)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(train_lm.CacheError, match=f"cannot be written.*{zoo.PIN_ENV}"):
        zoo.load_stdlib_lm(tmp_path / "absent", max_steps=3)


def test_pinned_model_dir_is_verified_never_trained(tmp_path, monkeypatch):
    # A model carried from a machine with another stdlib: other key, still verified, used with a warning.
    pinned = tmp_path / "carried"
    _fake_artifact(pinned, "other-python-key")
    monkeypatch.setattr(train_lm, "train", lambda *a, **k: pytest.fail("a pinned model must never be retrained"))
    monkeypatch.setenv(zoo.PIN_ENV, str(pinned))
    with pytest.warns(RuntimeWarning, match="not this interpreter's"):
        model, _ = zoo.load_stdlib_lm()
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(ValueError, match="max_steps"):
        zoo.load_stdlib_lm(max_steps=3)
    (pinned / "config.json").write_text("{}")  # tampered: the manifest check refuses it
    with pytest.raises(train_lm.CacheError, match="config.json does not match"):
        zoo.load_stdlib_lm()


def test_train_settings_validation():
    with pytest.raises(ValueError, match="unknown training setting.*'layers'"):
        train_lm.TrainSettings.with_overrides(layers=3)
    with pytest.raises(ValueError, match="TrainSettings.max_steps"):
        train_lm.TrainSettings(max_steps=0)
    with pytest.raises(ValueError, match="TrainSettings.num_kv_heads"):
        train_lm.TrainSettings(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="TrainSettings.lr"):
        train_lm.TrainSettings(lr=0)
    a, b = train_lm.TrainSettings(), train_lm.TrainSettings(max_steps=5)
    assert train_lm.cache_key(a, "d") != train_lm.cache_key(b, "d") != train_lm.cache_key(b, "e")
    assert json.dumps(train_lm.cache_key(a, "d"))


def test_out_dir_with_foreign_files_is_never_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        train_lm._prepare_out(tmp_path)


def test_cli_reports_a_verified_cache_without_training(tmp_path, monkeypatch, capsys):
    key = train_lm.default_dir(train_lm.TrainSettings(max_steps=3))[1]
    _fake_artifact(tmp_path / "m", key)
    monkeypatch.setattr(train_lm, "train", lambda *a, **k: pytest.fail("must not train"))
    assert train_lm.main(["--out", str(tmp_path / "m"), "--max-steps", "3", "--no-progress"]) == 0
    assert "already trained and verified" in capsys.readouterr().out


def test_llama_8b_has_llama_3_1_8b_shape_and_is_llama_only():
    cfg = zoo.random_config("llama", "8b")
    with torch.device("meta"):
        model = zoo._model_class("llama")(cfg)
    assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9  # Llama-3.1-8B: 8.03e9
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (4096, 14336, 8, False)
    assert "llama-8b" in zoo.MODELS and "gpt2-8b" not in zoo.MODELS
    with pytest.raises(ValueError, match="size='8b' is not one of .* for gpt2"):
        zoo.random_config("gpt2", "8b")
