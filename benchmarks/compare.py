"""Compare two result files of one benchmark (kernels.py or decode.py JSON): the rows both have, before / after.

A GPU session's numbers only mean something next to the last session's on the same kind of card, and reading
two JSON files by eye is where mistakes slip in. This prints, per row both files have, the old and new value
and new / old, and refuses files of different benchmarks, or of different devices unless --any-device (the
header line names both devices).

    python benchmarks/compare.py benchmarks/results/kernels-h100-2026-11-27-s13.json $OUT/kernels.json
    python benchmarks/compare.py benchmarks/results/decode-h100-llama-1b-2026-11-27-s13.json $OUT/decode.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Per benchmark: what identifies a row, and its measured values with whether bigger is better.
KINDS = {
    "kernels": (("shape", "m", "variant"), {"ms": False, "gb_per_s": True}),
    "decode": (("config",), {"tok_s_b1": True, "tok_s_b8": True, "compile_and_time_s": False}),
}


def kind_of(data: dict) -> str:
    """"kernels" or "decode", from a result file's fields; ValueError for anything else."""
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError("no 'rows' list: not a kernels.py or decode.py result file")
    if all("variant" in r and "shape" in r for r in rows):
        return "kernels"
    if all("config" in r for r in rows):
        return "decode"
    raise ValueError("rows are neither kernels.py's (shape, variant) nor decode.py's (config)")


def device_of(data: dict) -> str:
    dev = data.get("device")
    return dev.get("name", str(dev)) if isinstance(dev, dict) else str(dev)


def compare(before: dict, after: dict, any_device: bool = False) -> list[dict]:
    """One dict per (row key, value) both files measured: before, after, ratio (after / before) and whether
    that is better."""
    kind = kind_of(before)
    if kind_of(after) != kind:
        raise ValueError(f"a {kind} file and a {kind_of(after)} file: compare like with like")
    if device_of(before) != device_of(after) and not any_device:
        raise ValueError(f"devices differ ({device_of(before)!r} vs {device_of(after)!r}): timings on two cards "
                         "do not compare (--any-device to print them anyway)")
    keys, values = KINDS[kind]
    old = {tuple(r.get(k) for k in keys): r for r in before["rows"]}
    out = []
    for r in after["rows"]:
        key = tuple(r.get(k) for k in keys)
        if key not in old:
            continue
        for field, bigger in values.items():
            a, b = old[key].get(field), r.get(field)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0:
                out.append(dict(row=" ".join(str(k) for k in key), field=field, before=a, after=b, ratio=b / a,
                                better=(b > a) == bigger and b != a))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--any-device", action="store_true", help="compare files from different devices anyway")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    try:
        before, after = (json.loads(f.read_text()) for f in (args.before, args.after))
        rows = compare(before, after, args.any_device)
    except (OSError, ValueError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(f"{args.before.name} ({device_of(before)}) -> {args.after.name} ({device_of(after)}): "
          f"{len(rows)} values in rows both have")
    for r in rows:
        print(f"  {r['row'][:60]:60} {r['field']:18} {r['before']:10.4g} -> {r['after']:10.4g}  "
              f"x{r['ratio']:.3f} {'better' if r['better'] else 'worse' if r['ratio'] != 1 else 'same'}")
    if args.json:
        args.json.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
