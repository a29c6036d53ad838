"""FuseRotaryQK: q's and k's rotary embeddings, on adjacent slices of one fused projection, become one (exact)."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.passes.fuse_rope_cache_write import FuseRopeCacheWrite
from effcompile.passes.fuse_rotary_qk import FuseRotaryQK
from effcompile.testing import static_cache_decode, tiny_hf


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64, heads=4)  # 4 query heads, 2 K/V heads


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "fuse_rotary_qk"]


def _rope_kernels(fast) -> int:
    return sum("rotate_half" in k.ops for g in ec.explain(fast).graphs for k in g.kernels)


def _decode(model, passes, batch=2):
    fast, logits, cache = static_cache_decode(model, passes, batch)
    return fast, logits, cache.layers[0].keys.clone()


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_qkv_ropes_become_one_kernel_and_match_bitwise(llama, batch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lower as for a GPU: the embeddings become Triton kernels
    quant = ec.Quantize(weights="int4", group_size=32)  # quantized: FuseParallelLinears fuses Q/K/V
    alone = FuseRopeCacheWrite(enabled=False)  # else the fused embedding joins the cache write (its own test)
    fast, got, got_keys = _decode(llama, [quant, alone], batch)
    plain, want, want_keys = _decode(llama, [quant, FuseRotaryQK(enabled=False), alone], batch)
    (rec,) = [r for r in _record(fast) if r.modified]
    assert rec.count == 2 and rec.where == ["layers.0.attn", "layers.1.attn"]
    assert _rope_kernels(fast) == 2 and _rope_kernels(plain) == 4  # one per layer instead of two
    assert torch.equal(got, want) and torch.equal(got_keys, want_keys)


def test_separate_projections_are_left_alone(llama):
    fast, got, _ = _decode(llama, None)  # float linears stay separate: q and k are not slices of one tensor
    (rec,) = [r for r in _record(fast)]
    assert not rec.modified and "not a head view of a slice" in rec.note
