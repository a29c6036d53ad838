"""The default pipeline: the exact passes every compile runs, in phase order, before codegen.

Phases (see compiler/pass_manager.py): canonicalize -> semantic (layer skipping, token pruning,
channel thresholding) -> quantize -> fuse. Codegen then partitions what is left into fused Triton
kernels. Lossy passes are never default: the user asks for them by config.
"""

from __future__ import annotations


def default_passes() -> list:
    """The exact pipeline used when ``passes=None``."""
    from effcompile.passes import RemoveDropout
    from effcompile.passes.attention_mask import AdditiveAttentionMask
    from effcompile.passes.fuse_cache_writes import FuseCacheWrites
    from effcompile.passes.fuse_gated_activation import FuseGatedActivation
    from effcompile.passes.fuse_parallel_linears import FuseParallelLinears
    from effcompile.passes.fuse_rope_cache_write import FuseRopeCacheWrite
    from effcompile.passes.fuse_rotary_qk import FuseRotaryQK
    from effcompile.passes.fuse_sparse_linear import FuseSparseLinear
    from effcompile.passes.grouped_attention import GroupedQueryAttention
    from effcompile.passes.remove_unused_factories import RemoveUnusedFactories

    # FuseSparseLinear fires only where a sparsify op (ThresholdChannels) feeds a linear;
    # FuseParallelLinears only where quantized linears (Quantize) share an input; GroupedQueryAttention
    # only where SDPA reads K/V heads repeated for grouped-query attention; AdditiveAttentionMask only
    # where several attention calls read one boolean mask; FuseCacheWrites only where a K/V pair is copied
    # into a cache at one index; RemoveUnusedFactories only where a tensor factory's result is never read;
    # FuseRotaryQK only where q and k are adjacent slices of one fused projection; FuseGatedActivation only
    # where silu(gate) * up reads the two halves of one fused (quantized or thresholded) projection;
    # FuseRopeCacheWrite only where a rotary embedding's k goes into a fused cache write, and Triton runs.
    return [RemoveDropout(), RemoveUnusedFactories(), FuseSparseLinear(), FuseParallelLinears(),
            FuseGatedActivation(), GroupedQueryAttention(), AdditiveAttentionMask(), FuseCacheWrites(),
            FuseRotaryQK(), FuseRopeCacheWrite()]
