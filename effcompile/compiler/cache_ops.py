"""IR ops effcompile::kv_cache_write (one layer's K/V cache update: positions, length counter, both copies) and
effcompile::rope_kv_cache_write (the same, with q's and k's rotary embedding applied on the way).

A static KV cache's update, as Hugging Face's StaticLayer writes it, is per layer and step
``position = arange(n) + length; length += n; keys.index_copy_(2, position, k); values.index_copy_(2,
position, v)``: five kernels on a GPU (arange, add, add_, two index copies) for a few hundred bytes of
data. This op is the whole update; passes/fuse_cache_writes.py puts it in the graph, codegen lowers it to
one Triton kernel (codegen/kernels/cache_write.py). With ``position`` given (a cache that receives its
positions) it only does the two copies; with ``length`` given it also derives them and advances the
counter. The eager implementation below runs the original torch ops, so it is the definition.

At decode a layer's rotary embedding (one kernel for q and k once passes/fuse_rotary_qk.py ran) feeds the
cache write with k: passes/fuse_rope_cache_write.py folds the embedding in, so the cache write's kernel
rotates k on its way into the cache and hands q back, one kernel instead of two.
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


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's apply_rotary_pos_emb on one tensor: ``x cos + rotate_half(x) sin``, op for op."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def rope_kv_cache_write_eager(keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, v: torch.Tensor, position: torch.Tensor | None,
                              length: torch.Tensor | None, heads_q: int) -> torch.Tensor:
    """x [B, Hq + Hk, n, D] holds q's heads then k's, before their rotary embedding (cos, sin broadcast to
    [B, 1, n, D]): rotate them all, write k's and v [B, Hk, n, D] into the cache as kv_cache_write_eager
    does, and return q's [B, Hq, n, D]."""
    out = rotary(x, cos, sin)
    kv_cache_write_eager(keys, values, out[:, heads_q:], v, position, length)
    return out[:, :heads_q].clone()  # an op's output may not be a view


def kv_cache_write_op():
    """The OpOverload passes/fuse_cache_writes.py inserts (``torch.ops.effcompile.kv_cache_write.default``)."""
    return torch.ops.effcompile.kv_cache_write.default


if not hasattr(torch.ops.effcompile, "rope_kv_cache_write"):

    @torch.library.custom_op("effcompile::rope_kv_cache_write", mutates_args=("keys", "values", "length"))
    def rope_kv_cache_write(keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, v: torch.Tensor, position: torch.Tensor | None,
                            length: torch.Tensor | None, heads_q: int) -> torch.Tensor:
        return rope_kv_cache_write_eager(keys, values, x, cos, sin, v, position, length, heads_q)

    @rope_kv_cache_write.register_fake
    def _rope_fake(keys, values, x, cos, sin, v, position, length, heads_q):
        return x.new_empty((x.shape[0], heads_q, *x.shape[2:]))


def rope_kv_cache_write_op():
    """The OpOverload passes/fuse_rope_cache_write.py inserts (``torch.ops.effcompile.rope_kv_cache_write``)."""
    return torch.ops.effcompile.rope_kv_cache_write.default
