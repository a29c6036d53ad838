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


def record(label: str, kept: torch.Tensor | int, total: int) -> None:
    """Count one call's zeroed inputs under ``label`` while measure_sparsity() is active."""
    if not _MEASURING or total == 0:
        return
    kept = int(kept.sum()) if isinstance(kept, torch.Tensor) else int(kept)
    with _LOCK:
        SPARSITY[label][0] += total - kept
        SPARSITY[label][1] += total


def measuring() -> bool:
    return _MEASURING > 0


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


def sparsify_eager(x: torch.Tensor, threshold: torch.Tensor, label: str, decode_only: bool) -> torch.Tensor:
    if decode_only and is_prefill(x):
        return x.clone()  # custom ops may not return an alias of an input
    keep = keep_mask(x, threshold)
    record(label, keep, keep.numel())
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


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


__all__ = ["SPARSITY", "is_prefill", "keep_mask", "measure_sparsity", "measuring", "record", "sparsify_eager",
           "sparsify_op"]
