"""IR op for activation sparsity: effcompile::sparsify zeroes inputs below a threshold and can count what it zeroed."""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict

import torch

_LOCK = threading.Lock()
_MEASURING = 0
# label -> [zeroed, total] input elements, filled only inside measure_sparsity() (counting costs a sync).
SPARSITY: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])


def is_prefill(x: torch.Tensor) -> bool:
    """More than one token per sequence: x is [..., S, K] with S > 1 (a 2-D input counts as decode)."""
    return x.dim() >= 3 and x.shape[-2] > 1


def keep_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Where |x| > threshold (a 0-d tensor, or one value per input channel [K])."""
    return x.abs() > threshold.to(x.dtype)


def fused_label(labels) -> str:
    """The label of one sparse linear standing for several (FuseParallelLinears): "a+b+c"."""
    return "+".join(labels)


def label_parts(label: str) -> list[str]:
    """The linears a (possibly fused) label stands for."""
    return label.split("+")


def record(label: str, kept: torch.Tensor | int, total: int) -> None:
    """Count one call's zeroed inputs under ``label`` while measure_sparsity() is active; "a+b" (linears
    FuseParallelLinears fused: one input, one threshold) counts them under each of a and b."""
    if not _MEASURING or total == 0:
        return
    rows = _ROWS[-1] if _ROWS else None
    if rows is not None and isinstance(kept, torch.Tensor) and kept.dim() == 3 and kept.shape[:2] == rows.shape:
        kept = kept[rows.to(kept.device)]  # real positions only (count_rows)
        total = kept.numel()
    kept = int(kept.sum()) if isinstance(kept, torch.Tensor) else int(kept)
    with _LOCK:
        for part in label_parts(label):
            SPARSITY[part][0] += total - kept
            SPARSITY[part][1] += total


def measuring() -> bool:
    return _MEASURING > 0


_ROWS: list[torch.Tensor] = []  # count_rows() masks, innermost last


@contextlib.contextmanager
def count_rows(mask: torch.Tensor):
    """Inside measure_sparsity(): count only the positions where ``mask`` ([batch, seq], e.g. a batch's
    attention_mask) is true, for inputs laid out [batch, seq, channels]; padding is not work anyone skips.
    Wrap each padded call: ``with count_rows(batch["attention_mask"]): model(**batch)``."""
    with _LOCK:
        _ROWS.append(mask.bool())
    try:
        yield
    finally:
        with _LOCK:
            _ROWS.pop()


@contextlib.contextmanager
def measure_sparsity(reset: bool = True):
    """Count achieved sparsity per label while the block runs; yields {label: fraction zeroed}, filled on exit.

    Counting happens in the eager (reference / CPU) implementations of the sparsity ops; a fused GPU
    kernel does not count, so measure on the path you want to know about.
    """
    global _MEASURING
    if reset:
        with _LOCK:
            SPARSITY.clear()
    result: dict[str, float] = {}
    with _LOCK:
        _MEASURING += 1
    try:
        yield result
    finally:
        with _LOCK:
            _MEASURING -= 1
            result.update({k: z / t for k, (z, t) in SPARSITY.items() if t})


def explain_lines(artifacts: dict, limit: int = 12) -> list[str]:
    """explain() rows for a thresholding pass's artifacts: per layer target, threshold and, after a
    measure_sparsity() run, the achieved sparsity (empty for artifacts of any other kind)."""
    layers = artifacts.get("layers") if isinstance(artifacts, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) and "threshold" in v for v in layers.values()):
        return []
    with _LOCK:
        live = {k: z / t for k, (z, t) in SPARSITY.items() if t}
    head = (f"    sparsity: method={artifacts.get('method')} target={artifacts.get('target')} "
            f"weighted={artifacts.get('weighted_target')} decode_only={artifacts.get('decode_only')}")
    if "padding_left_out" in artifacts:
        head += f" (calibrated on real tokens: {artifacts['padding_left_out']:.0%} padding left out)"
    rows = [head, f"      {'layer':<44} {'kind':<9} {'target':>7} {'calib':>7} {'achieved':>9}  threshold"]
    for label, v in list(layers.items())[:limit]:
        thr = v["threshold"]
        thr = (f"per-channel median {thr.get('median')}" if isinstance(thr, dict) else f"{thr}")
        got = f"{live[label]:.3f}" if label in live else "-"
        rows.append(f"      {label[-44:]:<44} {v.get('kind', ''):<9} {v.get('target', 0):>7.3f} "
                    f"{v.get('calibrated', 0):>7.3f} {got:>9}  {thr}")
    if len(layers) > limit:
        rows.append(f"      ... {len(layers) - limit} more layers")
    measured = [live[k] for k in layers if k in live]
    rows.append("      achieved (last measure_sparsity run): "
                + (f"mean {sum(measured) / len(measured):.3f} over {len(measured)} layers" if measured
                   else "not measured yet (run calls inside effcompile.compiler.sparse_ops.measure_sparsity())"))
    return rows


@contextlib.contextmanager
def not_measuring():
    """Counting off inside the block: a pass's own calibration runs must not count as the model's."""
    global _MEASURING
    with _LOCK:
        saved, _MEASURING = _MEASURING, 0
    try:
        yield
    finally:
        with _LOCK:
            _MEASURING += saved


def threshold_input(x: torch.Tensor, threshold: torch.Tensor, label: str,
                    decode_only: bool) -> tuple[torch.Tensor, bool]:
    """(x with sub-threshold inputs zeroed, whether thresholding applied); counts under measure_sparsity().
    With decode_only, prefill-shaped inputs come back as x itself (not thresholded)."""
    if decode_only and is_prefill(x):
        return x, False
    keep = keep_mask(x, threshold)
    record(label, keep, keep.numel())
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), True


def sparsify_eager(x: torch.Tensor, threshold: torch.Tensor, label: str, decode_only: bool) -> torch.Tensor:
    out, applied = threshold_input(x, threshold, label, decode_only)
    return out if applied else x.clone()  # custom ops may not return an alias of an input


if not hasattr(torch.ops.effcompile, "sparsify"):

    @torch.library.custom_op("effcompile::sparsify", mutates_args=())
    def sparsify(x: torch.Tensor, threshold: torch.Tensor, label: str, decode_only: bool) -> torch.Tensor:
        """x where |x| > threshold, else 0; with decode_only, prefill-shaped inputs pass through unchanged."""
        return sparsify_eager(x, threshold, label, decode_only)

    @sparsify.register_fake
    def _sparsify_fake(x, threshold, label, decode_only):
        return torch.empty_like(x)


def sparsify_op():
    """The OpOverload passes insert (``torch.ops.effcompile.sparsify.default``)."""
    return torch.ops.effcompile.sparsify.default


__all__ = ["SPARSITY", "count_rows", "explain_lines", "fused_label", "is_prefill", "keep_mask", "label_parts",
           "measure_sparsity", "measuring", "not_measuring", "record", "sparsify_eager", "sparsify_op",
           "threshold_input"]
