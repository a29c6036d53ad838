"""Decode attention kernels (codegen/kernels/decode_attention.py) against SDPA, under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import decode_attention as DA
from effcompile.compiler import attention_ops


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(b, hq, hkv, length, d, dtype, last=None, seed=0):
    """[b, hq, 1, d] queries over [b, hkv, length, d] caches; ``last``: the mask hides positions past it (per
    sequence when a list: an additive [b, 1, 1, length] mask, as HF builds for a static cache)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype) for shape in
               ((b, hq, 1, d), (b, hkv, length, d), (b, hkv, length, d)))
    mask = None
    if last is not None:
        mask = torch.zeros(b, 1, 1, length, dtype=dtype)
        for i, p in enumerate(last if isinstance(last, list) else [last] * b):
            mask[i, ..., p + 1:] = float("-inf")
    return q, k, v, mask


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("b,hq,hkv,length,d,dtype,last", [
    (1, 8, 2, 37, 64, torch.float32, 20),  # GQA 4, one block, the mask hides its tail
    (3, 4, 4, 130, 32, torch.float32, [5, 100, 129]),  # MHA, three blocks, one split left all -inf
    (2, 8, 1, 200, 64, torch.bfloat16, None),  # MQA, no mask
    (1, 32, 8, 300, 128, torch.float16, 70),  # Llama-3's grouping, head dim 128
    (2, 6, 3, 65, 16, torch.float32, [0, 64]),  # 2 query heads a K/V head, a block of one position
], ids=["gqa4", "mha-3-blocks", "mqa-bf16", "llama3-fp16", "odd"])
def test_decode_attention_matches_sdpa(b, hq, hkv, length, d, dtype, last, splits):
    q, k, v, mask = _case(b, hq, hkv, length, d, dtype, last)
    got = DA.launch(q, k, v, mask, None, splits=splits)
    want = attention_ops.gqa_attention_eager(q, k, v, mask, 0.0, False, None)
    assert got.shape == want.shape and got.dtype == dtype
    err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    assert err <= TOL[dtype], err


def test_strided_views_scale_and_a_broadcast_mask():
    # q as a head view of a projection, K/V as slices of a longer cache, an explicit scale, one mask for the batch
    q, k, v, mask = _case(2, 4, 2, 96, 32, torch.float32, 50)
    qv = torch.randn(2, 1, 6, 32)[:, :, :4].transpose(1, 2)  # [2, 4, 1, 32], not contiguous
    kb, vb = torch.randn(2, 2, 128, 32), torch.randn(2, 2, 128, 32)
    got = DA.launch(qv, kb[:, :, :96], vb[:, :, :96], mask[:1], 0.3, splits=2)
    want = attention_ops.gqa_attention_eager(qv, kb[:, :, :96], vb[:, :, :96], mask[:1], 0.0, False, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_blocks_the_mask_hides_are_not_read():
    # K / V past the last visible position are NaN: a kernel that read them would return NaN.
    q, k, v, mask = _case(1, 4, 2, 256, 32, torch.float32, 40)
    k[:, :, 64:], v[:, :, 64:] = float("nan"), float("nan")
    got = DA.launch(q, k, v, mask, None, splits=4)
    want = attention_ops.gqa_attention_eager(q[..., :], k[:, :, :64], v[:, :, :64], mask[..., :64], 0.0, False, None)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why,args", [
    ("one query token", lambda q, k, v, m: (q.expand(-1, -1, 3, -1), k, v, m, 0.0, False)),
    ("is_causal", lambda q, k, v, m: (q, k, v, None, 0.0, True)),
    ("boolean mask", lambda q, k, v, m: (q, k, v, m == 0, 0.0, False)),
    ("power of two", lambda q, k, v, m: (q[..., :24], k[..., :24], v[..., :24], m, 0.0, False)),
])
def test_calls_the_kernels_do_not_take_run_sdpa_and_say_why(why, args):
    q, k, v, mask = _case(1, 4, 2, 40, 32, torch.float32, 30)
    call = args(q, k, v, mask)
    assert why in DA.supported(*call)
    before = cg_ops.PATH_COUNTS[DA.NAME]["torch"]
    got = DA.run(*call, None)
    want = attention_ops.gqa_attention_eager(*call, None)
    torch.testing.assert_close(got, want)
    assert cg_ops.PATH_COUNTS[DA.NAME]["torch"] == before + 1
