"""Train the small stdlib Llama (HF LlamaForCausalLM + byte-level BPE) on CPU and cache it with a verified manifest."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from effcompile.bench import corpus
from effcompile.bench.metrics import perplexity, unigram_perplexity

log = logging.getLogger("effcompile.bench")

FORMAT = 1  # bump when the artifact layout or the training recipe changes meaning
EOS = "<|endoftext|>"
FILES = ("model.safetensors", "config.json", "tokenizer.json")
_OURS = frozenset(FILES) | {"manifest.json", "generation_config.json"}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained weights (together with the stdlib data hash)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: 2 query heads share each K/V head
    context: int = 128
    batch_size: int = 16
    max_steps: int = 1200
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 256  # held-out windows of `context` tokens scored for perplexity

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v, lowest = getattr(self, f.name), (0 if f.name in ("seed", "warmup_steps") else 1)
            if f.name in ("lr", "weight_decay"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (f.name == "lr" and v == 0):
                    raise ValueError(f"TrainSettings.{f.name} must be a {'positive' if f.name == 'lr' else 'non-negative'} number, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < lowest:
                raise ValueError(f"TrainSettings.{f.name} must be an int >= {lowest}, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TrainSettings.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TrainSettings.num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.vocab_size < 300:  # 256 byte symbols + the special token + a few merges
            raise ValueError(f"TrainSettings.vocab_size={self.vocab_size} must be >= 300 for a byte-level BPE")

    @classmethod
    def with_overrides(cls, **overrides) -> TrainSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown training setting(s) {bad}; valid: {', '.join(sorted(names))}")
        return cls(**overrides)


class CacheError(ValueError):
    """A cached model directory that is missing, corrupt or trained with other settings/data."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(settings: TrainSettings, data_sha: str) -> str:
    """Short hash naming the cache directory: settings + training data + artifact format."""
    blob = json.dumps({"format": FORMAT, "settings": dataclasses.asdict(settings), "data": data_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def models_root() -> Path:
    """``$EFFCOMPILE_MODEL_DIR`` if set, else ``~/.cache/effcompile/models``."""
    env = os.environ.get("EFFCOMPILE_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "effcompile" / "models"


def default_dir(settings: TrainSettings | None = None) -> tuple[Path, str]:
    """(cache directory, key) of the stdlib LM for ``settings`` on this interpreter's stdlib."""
    settings = settings or TrainSettings()
    key = cache_key(settings, corpus.data_hash(corpus.stdlib_sources("train")))
    return models_root() / f"stdlib-llama-{key}", key


def verify(path: Path, key: str | None = None) -> dict:
    """Check a cached model directory against its manifest; returns the manifest or raises CacheError."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError as e:
        raise CacheError(f"{path}: no manifest.json") from e
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable manifest.json ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'} != {FORMAT}")
    if key is not None and manifest.get("key") != key:
        raise CacheError(f"{path}: trained for key {manifest.get('key')!r}, expected {key!r} (other settings or stdlib)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CacheError(f"{path}: manifest.json has no 'files' table")
    for name in FILES:
        want = files.get(name)
        if not (path / name).is_file():
            raise CacheError(f"{path}: missing {name}")
        if want != _sha256_file(path / name):
            raise CacheError(f"{path}: {name} does not match its sha256 in manifest.json")
    return manifest


def write_manifest(path: Path, key: str, fields: dict) -> dict:
    """Hash the artifact files in ``path`` and write manifest.json (format, key, hashes + ``fields``)."""
    path = Path(path)
    manifest = {**fields, "format": FORMAT, "name": "stdlib-llama", "key": key,
                "files": {name: _sha256_file(path / name) for name in FILES}}
    manifest["weights_sha256"] = manifest["files"]["model.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, texts: list[str]) -> torch.Tensor:
    """One token stream of ``texts`` (a ``tokenizers.Tokenizer``), each document followed by EOS."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # documents joined by EOS, as a causal LM sees separate files
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _llama_config(s: TrainSettings, vocab: int, eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                       num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                       num_key_value_heads=s.num_kv_heads, max_position_embeddings=s.context,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def _lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))  # cosine down to 10%


def _prepare_out(out_dir: Path) -> Path:
    """The sibling temp path to build the artifact in; the final rename makes it appear atomically."""
    # Only ever replace a directory made of our own file names (e.g. a corrupt cache), never user data.
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OURS) if out_dir.is_dir() else []
    if foreign or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"out_dir {out_dir} holds files that are not a stdlib-lm artifact ({foreign[:3]}); refusing to overwrite it")
    return out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")


def train(out_dir: str | Path | None = None, *, max_minutes: float = 15.0, progress: bool = True,
          **overrides) -> Path:
    """Train the stdlib LM (``overrides`` are TrainSettings fields, e.g. ``max_steps=20``); returns its dir.

    ``max_minutes`` is a safety cap: hitting it stops early (logged, ``stopped_early`` in the manifest),
    which makes the weights depend on machine speed, so the default step budget stays well below it.
    """
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    settings = TrainSettings.with_overrides(**overrides)
    if not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0, got {max_minutes!r}")
    t0 = time.perf_counter()
    train_src, held_src = corpus.stdlib_sources("train"), corpus.stdlib_sources("heldout")
    if not held_src:
        raise RuntimeError("the held-out split of the stdlib is empty")
    data_sha = corpus.data_hash(train_src)
    key = cache_key(settings, data_sha)
    out_dir = Path(out_dir) if out_dir is not None else models_root() / f"stdlib-llama-{key}"
    tmp = _prepare_out(out_dir)

    try:
        tok = _train_tokenizer([t for _, t in train_src], settings.vocab_size)
        train_ids, held_ids = encode_docs(tok, [t for _, t in train_src]), encode_docs(tok, [t for _, t in held_src])
        vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
        if train_ids.numel() <= settings.context + 1:
            raise RuntimeError(f"only {train_ids.numel()} training tokens for context={settings.context}")
        prep_s = time.perf_counter() - t0

        with torch.random.fork_rng():  # leave the caller's global RNG untouched
            torch.manual_seed(settings.seed)
            model = LlamaForCausalLM(_llama_config(settings, vocab, eos))
            n_params = sum(p.numel() for p in model.parameters())
            decay = [p for p in model.parameters() if p.dim() >= 2]
            no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: decaying them only hurts
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
            gen = torch.Generator().manual_seed(settings.seed)
            model.train()
            t_train, step, stopped_early, losses = time.perf_counter(), 0, False, []
            bar = tqdm(total=settings.max_steps, desc="stdlib-lm", unit="step", disable=not progress, file=sys.stderr)
            while step < settings.max_steps:
                if time.perf_counter() - t_train > max_minutes * 60:
                    stopped_early = True
                    log.warning("stdlib-lm: max_minutes=%s reached after %d/%d steps; stopping early "
                                "(weights now depend on this machine's speed)", max_minutes, step, settings.max_steps)
                    break
                starts = torch.randint(0, train_ids.numel() - settings.context - 1, (settings.batch_size,), generator=gen)
                batch = torch.stack([train_ids[s:s + settings.context + 1] for s in starts.tolist()])
                for g in opt.param_groups:
                    g["lr"] = _lr(step, settings)
                logits = model(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
            train_s = time.perf_counter() - t_train
            model.eval()
            ppl = perplexity(model, held_ids, window=settings.context, max_windows=settings.eval_windows)
        uni = unigram_perplexity(train_ids, held_ids, vocab, window=settings.context, max_windows=settings.eval_windows)
        eval_tokens = min(settings.eval_windows, (held_ids.numel() - 1) // settings.context) * settings.context

        # Created only now, so a run killed while training leaves nothing on disk.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)  # safetensors + config.json (+ generation_config.json)
        tok.save(str(tmp / "tokenizer.json"))
        import tokenizers
        import transformers

        write_manifest(tmp, key, {
            "settings": dataclasses.asdict(settings),
            "model": {"class": "LlamaForCausalLM", "params": n_params, "vocab_size": vocab, "eos_token_id": eos},
            "data": {"sha256": data_sha, "heldout_sha256": corpus.data_hash(held_src), "stdlib": str(corpus.stdlib_root()), "python": sys.version.split()[0],
                     "train_files": len(train_src), "heldout_files": len(held_src),
                     "train_tokens": train_ids.numel(), "heldout_tokens": held_ids.numel(),
                     "heldout_every": corpus.HELDOUT_EVERY},
            "results": {"heldout_perplexity": ppl, "unigram_perplexity": uni, "eval_tokens": eval_tokens,
                        "steps": step, "tokens_seen": step * settings.batch_size * settings.context,
                        "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                        "stopped_early": stopped_early, "max_minutes": max_minutes,
                        "prep_seconds": round(prep_s, 1), "train_seconds": round(train_s, 1),
                        "total_seconds": round(time.perf_counter() - t0, 1)},
            "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__, "threads": torch.get_num_threads()},
        })
        if out_dir.exists():  # checked by _prepare_out to hold only our files
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:  # a crash or Ctrl-C leaves no half-written temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.warning("stdlib-lm: trained %d params for %d steps in %.0f s; held-out perplexity %.1f (unigram %.1f) -> %s",
                n_params, step, train_s, ppl, uni, out_dir)
    return out_dir


def load(path: str | Path, key: str | None = None):
    """(model, tokenizer) from a verified directory; raises CacheError if anything does not check out."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    manifest = verify(path, key)
    if manifest.get("results", {}).get("stopped_early"):
        warnings.warn(f"{path}: training hit its time cap before max_steps; weights depend on that machine's "
                      "speed (retrain with a larger --max-minutes for the reproducible model)", RuntimeWarning, stacklevel=2)
    model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True).eval()  # safetensors only: no pickle
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=EOS, bos_token=EOS,
                                  pad_token=EOS, unk_token=None)
    return model, tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m effcompile.bench.train_lm", description=__doc__)
    p.add_argument("--out", type=Path, help="model dir (default: ROOT/stdlib-llama-<key>, ROOT = $EFFCOMPILE_MODEL_DIR or ~/.cache/effcompile/models)")
    p.add_argument("--max-minutes", type=float, default=15.0, help="safety cap on training time (default 15)")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {TrainSettings.max_steps})")
    p.add_argument("--force", action="store_true", help="retrain even if a verified model is cached")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 avoids OpenMP "
                   "spin-wait slowdowns when another process shares the cores")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    settings = TrainSettings.with_overrides(**overrides)
    path, key = default_dir(settings)
    path = args.out or path
    if not args.force:
        try:
            manifest = verify(path, key)
            print(f"already trained and verified: {path}")
            print(json.dumps(manifest["results"], indent=2))
            return 0
        except CacheError as e:
            if (path / "manifest.json").exists():
                log.warning("cached model rejected (%s); retraining", e)
    path = train(path, max_minutes=args.max_minutes, progress=not args.no_progress, **overrides)
    print(json.dumps(verify(path, key)["results"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
