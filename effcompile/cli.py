"""The `effcompile` command line: `explain`, `cache {ls,info,clear}`; subcommands register in COMMANDS."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _store(args):
    from effcompile.runtime.cache import CacheStore

    return CacheStore(args.cache_dir)


def _cache_ls(args) -> int:
    entries = _store(args).entries()
    if args.json:
        print(json.dumps(entries, indent=1, default=str))
        return 0
    if not entries:
        print("(cache is empty)")
        return 0
    print(f"{'digest':16}  {'size':>10}  {'created':19}  {'graph':16}  note")
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["created"])) if e.get("created") else "?"
        note = e.get("error") or ", ".join(f"{k}={v}" for k, v in sorted((e.get("user") or {}).items())
                                           if isinstance(v, str | int | float))[:60]
        print(f"{e['digest'][:16]}  {_human(e['bytes']):>10}  {created:19}  {str(e.get('graph'))[:16]:16}  {note}")
    return 0


def _cache_info(args) -> int:
    info = _store(args).info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"path:    {info['path']}")
    print(f"entries: {info['entries']}")
    print(f"size:    {_human(info['bytes'])}")
    return 0


def _cache_clear(args) -> int:
    n = _store(args).clear()
    print(f"removed {n} cache entr{'y' if n == 1 else 'ies'}")
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect or clear the compiled-graph cache")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $EFFCOMPILE_CACHE_DIR, "
                   "else $XDG_CACHE_HOME/effcompile or ~/.cache/effcompile)")
    csub = p.add_subparsers(dest="cache_cmd", required=True, metavar="{ls,info,clear}")
    for name, fn, text in (("ls", _cache_ls, "list entries"), ("info", _cache_info, "location and size"),
                           ("clear", _cache_clear, "remove every entry (no confirmation)")):
        c = csub.add_parser(name, help=text)
        if name != "clear":
            c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(func=fn)


EXPLAIN_MODELS = {
    "minilm": "real MiniLM-L6 sentence encoder (needs the 'hf' extra)",
    "llama-tiny": "random-init HF Llama, 2 layers",
    "gpt2-tiny": "random-init HF GPT-2, 2 layers",
    "bert-tiny": "random-init HF BERT, 2 layers",
}


def _explain_model(name: str, batch: int, seq: int):
    import torch

    from effcompile import testing

    if name == "minilm":
        model, tok = testing.load_minilm()
        text = "effcompile captures the model, rewrites the graph and generates fused kernels. " * 16
        inputs = dict(tok([text] * batch, truncation=True, max_length=seq, return_tensors="pt"))
        return model, inputs
    if name in EXPLAIN_MODELS:
        model = testing.tiny_hf(name.split("-")[0])
        return model, {"input_ids": torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))}
    valid = ", ".join(EXPLAIN_MODELS)
    raise SystemExit(f"effcompile explain: unknown model {name!r}; valid: {valid}")


def _explain(args) -> int:
    import torch

    import effcompile as ec

    model, inputs = _explain_model(args.model, args.batch, args.seq)
    fast = ec.effcompile(model, cache_dir=args.cache_dir, cache=not args.no_cache)
    with torch.no_grad():
        ref, out = model(**inputs), fast(**inputs)
    ref, out = ref[0], out[0]  # first output (hidden states or logits)
    print(ec.explain(fast))
    print(f"\nmax |compiled - eager| on the first output: {(ref - out).abs().max().item():.3e}")
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="compile a model and print what effcompile did to it")
    p.add_argument("model", help="one of: " + ", ".join(f"{k} ({v})" for k, v in EXPLAIN_MODELS.items()))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true", help="keep compiled graphs in memory only")
    p.set_defaults(func=_explain)


def _bench(args) -> int:
    from effcompile.bench.command import main

    return main(args)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure quality and speed of a zoo model under a pass spec (or a sweep)")
    from effcompile.bench.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)


# Each entry adds one subcommand to the top-level parser and sets `func` (args -> exit code) on it.
# To add `explain` or `bench`, write an `_add_x(sub)` like `_add_cache` and append it here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_cache, _add_explain]
COMMANDS.append(_add_bench)


def _add_bisect(sub) -> None:
    from effcompile.compiler.bisect import add_cli

    add_cli(sub)


COMMANDS.append(_add_bisect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effcompile", description="effcompile: JIT inference compiler")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PermissionError as e:  # CacheDirError: an unsafe cache directory; the message says the fix
        print(f"effcompile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
