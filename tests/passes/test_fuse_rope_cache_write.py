"""FuseRopeCacheWrite: the rotary embedding whose k goes only into a K/V cache write joins that write (exact)."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import cache_write as C
from effcompile.passes.fuse_rope_cache_write import FuseRopeCacheWrite
from effcompile.testing import static_cache_decode, tiny_hf


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64, heads=4)  # 4 query heads, 2 K/V heads


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "fuse_rope_cache_write"]


def _kernels(fast, ops: str) -> int:
    return sum(ops in k.ops for g in ec.explain(fast).graphs for k in g.kernels)


def _decode(model, passes, batch=2):
    fast, logits, cache = static_cache_decode(model, passes, batch)
    return fast, logits, [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.interpreter
@pytest.mark.parametrize("quantized", [True, False], ids=["fused-qkv", "separate-q-k"])
def test_the_embedding_joins_the_cache_write_and_decode_matches_bitwise(llama, quantized, monkeypatch):
    # Quantized, Q/K/V is one projection and q's and k's embedding one op (FuseRotaryQK): the cache write takes
    # it whole and hands q back. Float, q and k are rotated apart: k's embedding joins the write, q's stays.
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lower as for a GPU
    quant = [ec.Quantize(weights="int4", group_size=32)] if quantized else []
    before = cg_ops.PATH_COUNTS[C.ROPE_NAME]["triton"]
    fast, got, got_cache = _decode(llama, quant or None)
    plain, want, want_cache = _decode(llama, [*quant, FuseRopeCacheWrite(enabled=False)])
    (rec,) = [r for r in _record(fast) if r.modified]
    assert rec.count == 2 and rec.where == ["layers.0.attn", "layers.1.attn"]
    assert cg_ops.PATH_COUNTS[C.ROPE_NAME]["triton"] - before == 4  # 2 layers x 2 decode steps, in the kernel
    rope_kernels = _kernels(fast, "rotate_half"), _kernels(plain, "rotate_half")
    assert rope_kernels == ((0, 2) if quantized else (2, 4))  # one generated embedding kernel fewer per layer
    assert _kernels(fast, "rope_kv_cache_write") == 2 and _kernels(plain, "rope_kv_cache_write") == 0
    assert torch.equal(got, want)
    for g, w in zip(got_cache, want_cache, strict=True):
        assert torch.equal(g, w)


def test_without_triton_the_embedding_stays_its_own_op(llama, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fast, _, _ = _decode(llama, [ec.Quantize(weights="int4", group_size=32)])
    (rec,) = _record(fast)
    assert not rec.modified and "no Triton kernel" in rec.note


@pytest.mark.interpreter
def test_a_rotated_k_read_besides_the_cache_write_is_left_alone(monkeypatch):
    # An embedding whose k is also read elsewhere keeps its kernel, said in the note.
    import torch.fx as fx

    from effcompile.compiler import cache_ops
    from effcompile.compiler.pass_manager import PassContext
    from effcompile.passes.fuse_rope_cache_write import fuse_rope_cache_write

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def f(keys, values, x, cos, sin, v, length):
        k = x * cos + torch.cat((-x[..., 2:], x[..., :2]), -1) * sin  # HF's rotate_half, head_dim 4
        cache_ops.kv_cache_write_op()(keys, values, k, v, None, length)
        return k.sum()

    args = (torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4), torch.randn(1, 2, 1, 4), torch.ones(1, 1, 1, 4),
            torch.zeros(1, 1, 1, 4), torch.randn(1, 2, 1, 4), torch.tensor(0))
    from effcompile.compiler.ir import annotate

    gm = fx.symbolic_trace(f)
    annotate(gm, args)
    res = fuse_rope_cache_write(gm, FuseRopeCacheWrite(), PassContext(example_inputs=args))
    assert not res.modified and "read besides by the cache write" in res.note
