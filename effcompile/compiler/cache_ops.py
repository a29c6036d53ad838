"""IR op effcompile::kv_cache_write: one layer's K/V cache update (positions, length counter, both copies).

A static KV cache's update, as Hugging Face's StaticLayer writes it, is per layer and step
``position = arange(n) + length; length += n; keys.index_copy_(2, position, k); values.index_copy_(2,
position, v)``: five kernels on a GPU (arange, add, add_, two index copies) for a few hundred bytes of
data. This op is the whole update; passes/fuse_cache_writes.py puts it in the graph, codegen lowers it to
one Triton kernel (codegen/kernels/cache_write.py). With ``position`` given (a cache that receives its
positions) it only does the two copies; with ``length`` given it also derives them and advances the
counter. The eager implementation below runs the original torch ops, so it is the definition.
"""

from __future__ import annotations

import torch


def kv_cache_write_eager(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         position: torch.Tensor | None, length: torch.Tensor | None) -> None:
    """Write k, v [B, H, n, D] into keys, values [B, H, L, D] at ``position`` [n], or at ``length`` +
    arange(n) and then advance ``length`` (a 0-dim integer tensor) by n."""
    if (position is None) == (length is None):
        raise ValueError("kv_cache_write takes exactly one of position (explicit) or length (a counter)")
    if position is None:
        position = torch.arange(k.shape[2], device=length.device) + length
        length.add_(k.shape[2])
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)


if not hasattr(torch.ops.effcompile, "kv_cache_write"):

    @torch.library.custom_op("effcompile::kv_cache_write", mutates_args=("keys", "values", "length"))
    def kv_cache_write(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       position: torch.Tensor | None, length: torch.Tensor | None) -> None:
        kv_cache_write_eager(keys, values, k, v, position, length)

    @kv_cache_write.register_fake
    def _fake(keys, values, k, v, position, length):
        return None


def kv_cache_write_op():
    """The OpOverload passes/fuse_cache_writes.py inserts (``torch.ops.effcompile.kv_cache_write.default``)."""
    return torch.ops.effcompile.kv_cache_write.default
