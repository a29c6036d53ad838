"""Collect a GPU-lane run (pytest -m gpu, spine benchmark, bench records) into one results JSON file."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path


def _tail(path: Path | None, chars: int = 4000) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


def _step(spec: str) -> tuple[str, dict]:
    """``name=rc[:log]`` -> (name, {"rc": int, "log_tail": ...}); a non-zero rc is a failed step."""
    name, _, rest = spec.partition("=")
    rc_text, _, log = rest.partition(":")
    if rc_text == "skip":  # name=skip:reason - a step the lane chose not to run (e.g. an untrained model)
        return name, {"skipped": log}
    try:
        rc = int(rc_text)
    except ValueError:
        raise SystemExit(f"--step {spec!r}: expected name=rc[:log]") from None
    out = {"rc": rc, "log_tail": _tail(Path(log) if log else None)}
    if rc != 0:
        out["failed"] = f"exit status {rc}"
    return name, out


def collect(steps: list[str], spine: Path | None, bench: list[Path], plots: list[Path]) -> dict:
    import torch

    from effcompile.bench.record import device_name, versions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {
        "lane": "gpu",
        "device": device,
        "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "steps": dict(_step(s) for s in steps),
    }
    if spine is not None:
        result["spine"] = (json.loads(spine.read_text()) if spine.exists()
                           else {"failed": f"{spine} was not written (see steps.spine)"})
    records = []
    for path in bench:
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    result["records"] = records
    result["plots"] = [str(p) for p in plots if p.exists()]
    return result


def default_name(device_name: str, date: str | None = None) -> str:
    """``<device>-<date>.json`` with the device name made file-safe (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    return f"{slug}-{date or datetime.date.today().isoformat()}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results-dir", default="benchmarks/results")
    p.add_argument("--step", action="append", default=[],
                   help="name=rc[:log file] or name=skip:reason, once per lane step")
    p.add_argument("--name", default=None, help="results file name (default: <device>-<date>.json)")
    p.add_argument("--spine", type=Path, default=None, help="spine.py output JSON")
    p.add_argument("--bench", type=Path, action="append", default=[], help="effcompile bench JSON-lines file")
    p.add_argument("--plot", type=Path, action="append", default=[], help="Pareto plot written by the lane")
    p.add_argument("--print-name", action="store_true", help="print the results file name and exit")
    args = p.parse_args(argv)
    if args.print_name:
        import torch

        from effcompile.bench.record import device_name

        print(default_name(device_name("cuda" if torch.cuda.is_available() else "cpu")))
        return 0
    result = collect(args.step, args.spine, args.bench, args.plot)
    out = Path(args.results_dir) / (args.name or default_name(result["device_name"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [k for k, v in result["steps"].items() if "failed" in v]
    print(f"wrote {out} ({len(result['records'])} bench records; failed steps: {', '.join(failed) or 'none'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
