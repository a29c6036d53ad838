"""The benchmark model zoo: real MiniLM, the stdlib-trained Llama, and random-init HF configs at several sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from effcompile.bench import corpus, train_lm
from effcompile.testing import load_minilm, tiny_hf

__all__ = ["KINDS", "MODELS", "SIZES", "ModelSpec", "ZooModel", "get_model", "heldout_ids", "load_minilm",
           "load_stdlib_lm", "random_config", "random_model"]

log = logging.getLogger("effcompile.bench")

KINDS = ("llama", "gpt2", "bert", "vit")
SIZES = ("tiny", "small", "base", "1b")  # "1b" is for GPU runs: ~1e9 params, ~4 GB in fp32
# Llama only: "8b", Llama-3.1-8B's shape (16 GB in bf16), where a decode step is dominated by the weight reads
# that quantization and thresholding cut, as in the papers' and TorchAO's headline numbers (GPU runs).
LLAMA_SIZES = (*SIZES, "8b")

# Per size: hidden, layers, heads, (kv heads), ffn, vocab, positions. "tiny" text models come from
# effcompile.testing.tiny_hf so tests and benchmarks share one definition.
_TEXT = {
    "small": dict(hidden=256, layers=4, heads=4, kv=2, ffn=704, vocab=4096, pos=512),
    "base": dict(hidden=768, layers=12, heads=12, kv=4, ffn=2048, vocab=32000, pos=2048),
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256, pos=4096),  # Llama-3.2-1B shape
    "8b": dict(hidden=4096, layers=32, heads=32, kv=8, ffn=14336, vocab=128256, pos=4096),  # Llama-3.1-8B shape
}
_GPT2_1B = dict(hidden=2048, layers=20, heads=16, vocab=50257, pos=1024)
_BERT_1B = dict(hidden=2048, layers=20, heads=16, ffn=8192, vocab=30522, pos=512)
_VIT = {  # hidden, layers, heads, ffn, image side, patch side
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=128, image=32, patch=8),
    "small": dict(hidden=256, layers=4, heads=4, ffn=1024, image=64, patch=8),
    "base": dict(hidden=768, layers=12, heads=12, ffn=3072, image=224, patch=16),  # ViT-B/16
    "1b": dict(hidden=1408, layers=40, heads=16, ffn=6144, image=224, patch=14),  # ViT-g/14 shape
}
_DEFAULT_SEQ = {"tiny": 32, "small": 128, "base": 128, "1b": 512, "8b": 512}


def _check(kind: str, size: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    sizes = LLAMA_SIZES if kind == "llama" else SIZES
    if size not in sizes:
        raise ValueError(f"size={size!r} is not one of {', '.join(sizes)} for {kind}")


def random_config(kind: str, size: str):
    """The transformers config of the random-init ``kind`` model at ``size`` (nothing is instantiated
    except for "tiny" text models, whose config comes from the tiny_hf test helper)."""
    import transformers as tf

    _check(kind, size)
    if kind == "vit":
        d = _VIT[size]
        return tf.ViTConfig(hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                            intermediate_size=d["ffn"], image_size=d["image"], patch_size=d["patch"])
    if size == "tiny":
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # only the config: no memory, RNG kept
            return tiny_hf(kind).config
    d = _TEXT[size]
    if kind == "llama":
        return tf.LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ffn"],
                              num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                              num_key_value_heads=d["kv"], max_position_embeddings=d["pos"],
                              tie_word_embeddings=size == "1b")
    if kind == "gpt2":
        d = _GPT2_1B if size == "1b" else {**d, "vocab": 50257 if size == "base" else d["vocab"]}  # base = GPT-2 124M
        # GPT2Config's default bos/eos id (50256) must exist in the smaller vocabularies too.
        return tf.GPT2Config(vocab_size=d["vocab"], n_embd=d["hidden"], n_layer=d["layers"], n_head=d["heads"],
                             n_positions=min(d["pos"], 1024), bos_token_id=d["vocab"] - 1, eos_token_id=d["vocab"] - 1)
    d = _BERT_1B if size == "1b" else d
    return tf.BertConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                         num_attention_heads=d["heads"], intermediate_size=d.get("ffn", 4 * d["hidden"]),
                         max_position_embeddings=d["pos"])


def _model_class(kind: str):
    import transformers as tf

    return {"llama": tf.LlamaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "bert": tf.BertModel, "vit": tf.ViTModel}[kind]


def random_model(kind: str, size: str = "tiny", *, seed: int = 0, device=None, dtype=None):
    """(model in eval mode, ``make_inputs(batch=2, seq=None, seed=0) -> dict``) for a random-init config.

    ``device``/``dtype`` build the weights in place (e.g. ``device="cuda"`` for "1b"). The global RNG
    is left untouched; the same ``seed`` gives the same weights.
    """
    _check(kind, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            if size == "tiny" and kind != "vit":
                model = tiny_hf(kind, seed=seed)
            else:
                model = _model_class(kind)(random_config(kind, size))
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    cfg = model.config
    if kind == "vit":
        def make_inputs(batch: int = 2, seq: int | None = None, seed: int = 0) -> dict:
            if seq is not None:
                raise ValueError(f"seq={seq!r}: a ViT takes images of {cfg.image_size}x{cfg.image_size}, not a sequence")
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
            return {"pixel_values": x.to(device=device or "cpu", dtype=dtype or torch.float32)}
    else:
        vocab, max_pos = cfg.vocab_size, getattr(cfg, "max_position_embeddings", None) or cfg.n_positions

        def make_inputs(batch: int = 2, seq: int | None = None, seed: int = 0) -> dict:
            seq = _DEFAULT_SEQ[size] if seq is None else seq
            if not 1 <= seq <= max_pos:
                raise ValueError(f"seq={seq} must be in [1, {max_pos}] for {kind}-{size}")
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            return {"input_ids": ids.to(device or "cpu"), "attention_mask": torch.ones_like(ids, device=device or "cpu")}
    return model, make_inputs


# ----------------------------------------------------------------------------- the stdlib LM
def load_stdlib_lm(cache_dir: str | Path | None = None, *, train_if_missing: bool = True,
                   max_minutes: float = 15.0, progress: bool = True, **overrides):
    """(LlamaForCausalLM, tokenizer) of the stdlib LM: loaded after hash verification, else trained.

    ``cache_dir`` is the model directory itself (default ``train_lm.models_root()/stdlib-llama-<key>``);
    ``overrides`` are TrainSettings fields. A corrupt or mismatched cache is retrained with a warning.

    ``$EFFCOMPILE_STDLIB_LM`` pins a trained directory instead (e.g. one carried to a GPU machine whose
    Python has another stdlib, so another key): its files are still verified against its manifest, it is
    never retrained, and a model trained on another stdlib is used with a warning naming both.
    """
    pinned = os.environ.get(PIN_ENV)
    if cache_dir is None and pinned:
        return _load_pinned(Path(pinned).expanduser(), overrides)
    settings = train_lm.TrainSettings.with_overrides(**overrides)
    default, key = train_lm.default_dir(settings)
    path = Path(cache_dir) if cache_dir is not None else default
    # A verified model needs no lock: training builds it beside the directory and renames it in whole (train_lm.train),
    # so a read-only models directory holding a good model still loads.
    with contextlib.suppress(train_lm.CacheError):
        return train_lm.load(path, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(f".{path.name}.lock")))
        lock.acquire()
    except OSError as e:
        raise train_lm.CacheError(f"stdlib-lm: no valid model at {path}, and its directory cannot be written to train "
                                  f"one ({e}); pass cache_dir= a writable directory, or set {PIN_ENV} to a trained "
                                  "model's directory") from e
    # One process trains, the others (pytest-xdist workers, parallel benchmarks) wait for it and then load: without
    # the lock a caller that does not train found no model mid-training (CI, session 21), and two that do trained twice.
    try:
        return _load_or_train(path, key, settings, train_if_missing, max_minutes, progress)
    finally:
        lock.release()


def _load_or_train(path: Path, key: str, settings, train_if_missing: bool, max_minutes: float, progress: bool):
    try:
        return train_lm.load(path, key)
    except train_lm.CacheError as e:
        if path.exists():
            if not train_if_missing:
                raise
            warnings.warn(f"stdlib-lm cache rejected ({e}); retraining", RuntimeWarning, stacklevel=3)
        elif not train_if_missing:
            raise
        else:
            log.warning("stdlib-lm: no cached model at %s; training it now, once (about 10 min on 2 CPU cores)", path)
    train_lm.train(path, max_minutes=max_minutes, progress=progress, **dataclasses.asdict(settings))
    return train_lm.load(path, key)


PIN_ENV = "EFFCOMPILE_STDLIB_LM"


def _load_pinned(path: Path, overrides: dict):
    """The stdlib LM from the directory ``$EFFCOMPILE_STDLIB_LM`` names: verified, never (re)trained."""
    if overrides:
        raise ValueError(f"{PIN_ENV} pins a trained model; training overrides {sorted(overrides)} cannot apply to it")
    manifest = train_lm.verify(path)  # file hashes against its own manifest; raises CacheError
    _, key = train_lm.default_dir()
    if manifest.get("key") != key:
        data = manifest.get("data", {})
        warnings.warn(f"{PIN_ENV}={path}: trained on Python {data.get('python', '?')}'s stdlib (key "
                      f"{manifest.get('key')}), not this interpreter's (key {key}); held-out metrics use this "
                      "interpreter's held-out files", RuntimeWarning, stacklevel=3)
    return train_lm.load(path)


@functools.lru_cache(maxsize=4)
def _heldout_ids(tokenizer) -> torch.Tensor:
    return train_lm.encode_docs(tokenizer.backend_tokenizer, [t for _, t in corpus.stdlib_sources("heldout")])


def heldout_ids(tokenizer) -> torch.Tensor:
    """The held-out stdlib files as one token stream (EOS between files), as the trainer scored them."""
    return _heldout_ids(tokenizer)


# ----------------------------------------------------------------------------- registry
@dataclasses.dataclass
class ZooModel:
    """A loaded model with a deterministic example-input builder; ``task`` picks its quality metrics."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[..., dict]
    task: str  # "embedding" | "causal-lm" | "encoder" | "vision"
    tokenizer: Any = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    description: str
    loader: Callable[..., ZooModel]
    builds_in_place: bool = False  # the loader takes device=/dtype= (random weights: built on the GPU directly)

    def load(self, device=None, dtype=None) -> ZooModel:
        return self.loader(device=device, dtype=dtype) if self.builds_in_place else self.loader()


def _minilm() -> ZooModel:
    model, tok = load_minilm()

    def make_inputs(batch: int = 2, seq: int | None = None, seed: int = 0) -> dict:
        texts = corpus.stdlib_corpus(batch, seed)  # real sentences, so padding and lengths are realistic
        return dict(tok(texts, padding=True, truncation=True, max_length=seq or 128, return_tensors="pt"))
    return ZooModel("minilm", model, make_inputs, "embedding", tok)


def _stdlib_lm() -> ZooModel:
    model, tok = load_stdlib_lm()
    ctx = model.config.max_position_embeddings

    def make_inputs(batch: int = 2, seq: int | None = None, seed: int = 0) -> dict:
        seq = ctx if seq is None else seq
        if not 1 <= seq <= ctx:
            raise ValueError(f"seq={seq} must be in [1, {ctx}] (the model's context)")
        ids = heldout_ids(tok)
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq, (batch,), generator=g).tolist()
        x = torch.stack([ids[s:s + seq] for s in starts])  # real held-out code, never trained on
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}
    return ZooModel("stdlib-lm", model, make_inputs, "causal-lm", tok)


def _random_spec(kind: str, size: str) -> ModelSpec:
    task = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "encoder", "vit": "vision"}[kind]

    def loader(device=None, dtype=None) -> ZooModel:
        model, make_inputs = random_model(kind, size, device=device, dtype=dtype)
        return ZooModel(f"{kind}-{size}", model, make_inputs, task)
    return ModelSpec(f"{kind}-{size}", task, f"random-init {kind} ({size})", loader, builds_in_place=True)


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "embedding", "all-MiniLM-L6-v2, real weights (22.7M params)", _minilm),
    "stdlib-lm": ModelSpec("stdlib-lm", "causal-lm", "Llama-style LM trained here on the Python stdlib", _stdlib_lm),
    **{f"{k}-{s}": _random_spec(k, s) for k in KINDS for s in (LLAMA_SIZES if k == "llama" else SIZES)},
}


def get_model(name: str, device=None, dtype=None) -> ZooModel:
    """Load a registered model by name; unknown names raise ValueError listing the valid ones.
    device/dtype: where random-init weights are built (a 1B model is not built on the CPU first)."""
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return spec.load(device=device, dtype=dtype)
