"""`effcompile bench`: arguments, one run or a sweep, JSON lines, Markdown tables and the Pareto plot."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The zoo (and torch) is not imported here: building the parser must stay cheap for every subcommand.
    p.add_argument("--model", required=True,
                   help="zoo model, e.g. minilm, stdlib-lm, llama-tiny, gpt2-small (an unknown name lists all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passes", default="none",
                   help='pass spec, e.g. "quantize(weights=int4,group_size=64)+remove_dropout"; "none" = dense')
    g.add_argument("--sweep", default=None,
                   help='grid spec, e.g. "quantize(weights=[int8,int4],group_size=[32,128])": every list is an axis')
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's own)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON-lines file; one record per run is appended")
    p.add_argument("--plot", default=None, help="Pareto plot PNG for --sweep (default: next to --output, "
                   "else ./pareto-<model>-<date>.png)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (causal LMs)")
    p.add_argument("--decode-batches", default="1,8", help="decode batch sizes, comma-separated")
    p.add_argument("--no-decode", action="store_true", help="skip the decode measurement")
    p.add_argument("--no-inductor", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="CUDA decode: time the Python loop instead of replaying a captured step")
    p.add_argument("--cache-dir", default=None, help="effcompile cache directory")
    p.add_argument("--no-cache", action="store_true", help="keep compiled graphs in memory only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _settings(args):
    import torch

    from effcompile.bench.harness import BenchSettings

    try:
        batches = tuple(int(b) for b in args.decode_batches.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--decode-batches={args.decode_batches!r}: comma-separated ints, e.g. 1,8") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return BenchSettings(batch=args.batch, seq=args.seq, device=device, dtype=args.dtype, reps=args.reps,
                         seed=args.seed, inductor=not args.no_inductor, decode=not args.no_decode,
                         decode_batches=batches, decode_steps=args.decode_steps, cache_dir=args.cache_dir,
                         cuda_graphs=not args.no_cuda_graphs,
                         cache=not args.no_cache)


def _plot_path(args, record: dict) -> Path:
    if args.plot:
        return Path(args.plot)
    day = datetime.date.today().isoformat()
    if args.output:
        out = Path(args.output)
        return out.with_name(f"{out.stem}-pareto-{record['model']}.png")
    return Path(f"pareto-{record['model']}-{day}.png")


def main(args: argparse.Namespace) -> int:
    from effcompile.bench import harness, report
    from effcompile.bench.spec import SpecError, expand_sweep, parse_passes
    from effcompile.bench.zoo import MODELS

    try:  # bad input fails here, before a model loads or anything is measured
        if args.model not in MODELS:
            raise ValueError(f"unknown model {args.model!r}; valid: {', '.join(MODELS)}")
        s = _settings(args)
        if args.sweep is None:
            parse_passes(args.passes)
        else:
            expand_sweep(args.sweep)
    except (SpecError, ValueError) as e:
        print(f"effcompile bench: error: {e}", file=sys.stderr)
        return 2
    written: list[dict] = []

    def keep(rec: dict) -> None:  # appended as each run ends, so a crash later keeps what was measured
        written.append(rec)
        if args.output:
            report.append_jsonl(args.output, [rec])

    try:
        if args.sweep is None:
            keep(harness.run(args.model, args.passes, s))
            invalid: list = []
        else:
            _, invalid = harness.sweep(args.model, args.sweep, s, progress=not args.quiet, on_record=keep)
    except (SpecError, ValueError) as e:
        print(f"effcompile bench: error: {e}", file=sys.stderr)
        return 2
    print(report.markdown_table(written))
    print()
    print(report.speed_table(written))
    for label, why in invalid:
        print(f"\nskipped invalid grid point {label}: {why}")
    if args.sweep is not None:
        path = report.pareto_plot(written, _plot_path(args, written[0]))
        print(f"\nPareto plot: {path}")
    if args.output:
        print(f"records appended to {args.output}")
    return 0
