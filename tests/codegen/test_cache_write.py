"""The one-kernel K/V cache update vs the torch ops it replaces, under TRITON_INTERPRET=1, odd shapes."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import cache_write as C
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import cache_ops

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(b, h, n, d, cache_len, dtype, *, start, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, cache_len, d, generator=g).to(dtype)
    values = torch.randn(b, h, cache_len, d, generator=g).to(dtype)
    k = torch.randn(b, h, n, d, generator=g).to(dtype)
    # v as Hugging Face makes it: a [b, n, h, d] projection transposed (not contiguous when n > 1)
    v = torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2) if strided else torch.randn(
        b, h, n, d, generator=g).to(dtype)
    return keys, values, k, v, torch.tensor(start)


def _both(case, use_position: bool):
    """(kernel's caches and counter, the torch ops'), from the same start."""
    keys, values, k, v, length = case
    pos = torch.arange(k.shape[2]) + length if use_position else None
    got = [keys.clone(), values.clone(), length.clone()]
    want = [keys.clone(), values.clone(), length.clone()]
    C.run(got[0], got[1], k, v, pos, None if use_position else got[2], mode=1)
    cache_ops.kv_cache_write_eager(want[0], want[1], k, v, pos, None if use_position else want[2])
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 1, 5, 7), (2, 5, 4, 40, 11), (3, 2, 9, 130, 12)], ids=str)
@pytest.mark.parametrize("use_position", [False, True], ids=["counter", "positions"])
def test_matches_the_torch_ops_bitwise(shape, dtype, use_position):
    b, h, n, d, cache_len = shape
    got, want = _both(_case(b, h, n, d, cache_len, dtype, start=cache_len - n, strided=n > 1), use_position)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert got[2].item() == (cache_len - n if use_position else cache_len)  # the counter advanced only if given
    assert plan.arrival_count(torch.device("cpu")).item() == 0  # the last program reset the arrival count


def test_three_writes_in_a_row_advance_the_counter_and_land_in_order():
    keys, values, k, v, length = _case(2, 3, 1, 8, 6, torch.float32, start=0)
    for step in range(3):
        C.run(keys, values, k + step, v - step, None, length, mode=1)
    assert length.item() == 3
    for step in range(3):
        assert torch.equal(keys[:, :, step], (k + step)[:, :, 0]) and torch.equal(values[:, :, step], (v - step)[:, :, 0])
    assert torch.count_nonzero(keys[:, :, 3:] - _case(2, 3, 1, 8, 6, torch.float32, start=0)[0][:, :, 3:]) == 0


def test_a_position_past_the_cache_is_not_written_and_eager_raises():
    case = _case(1, 2, 2, 4, 5, torch.float32, start=4)  # tokens at 4 (fits) and 5 (past the end)
    keys, values, k, v, length = case
    before = keys.clone()
    C.run(keys, values, k, v, None, length, mode=1)
    assert torch.equal(keys[:, :, 4], k[:, :, 0]) and torch.equal(keys[:, :, :4], before[:, :, :4])
    keys, values, k, v, length = _case(1, 2, 2, 4, 5, torch.float32, start=4)
    with pytest.raises(IndexError):
        cache_ops.kv_cache_write_eager(keys, values, k, v, None, length)


def test_calls_it_cannot_take_run_the_torch_ops_and_say_so():
    keys, values, k, v, length = _case(1, 2, 1, 4, 5, torch.float32, start=0)
    assert "dtype" in C.supported(keys, values, k, v.double(), None, length)
    five_d = [t[..., None].expand(*t.shape, 3).contiguous() for t in (keys, values, k, v)]  # 5-D: torch ops
    before = cg_ops.PATH_COUNTS[C.NAME]["torch"]
    C.run(*five_d, None, length, mode=1)
    assert cg_ops.PATH_COUNTS[C.NAME]["torch"] == before + 1 and length.item() == 1
    assert torch.equal(five_d[0][:, :, 0], five_d[2][:, :, 0])
    with pytest.raises(ValueError, match="exactly one of position"):
        C.run(keys, values, k, v, torch.tensor([0]), length, mode=1)


def _rope_case(b, hq, hk, n, d, cache_len, dtype, *, start, shared_positions=False, seed=0):
    """Caches, x = q's and k's heads before the rotary embedding as HF makes them (a head view of one fused
    projection, strided), cos, sin, v and a counter."""
    g = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(b, hk, cache_len, d, generator=g).to(dtype) for _ in range(2))
    qkv = torch.randn(b, n, (hq + 2 * hk) * d, generator=g).to(dtype)
    x = qkv[..., :(hq + hk) * d].view(b, n, hq + hk, d).transpose(1, 2)
    v = qkv[..., (hq + hk) * d:].view(b, n, hk, d).transpose(1, 2)
    angles = torch.rand(1 if shared_positions else b, 1, n, d // 2, generator=g) * 6
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    return keys, values, x, cos, sin, v, torch.tensor(start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 8, 7), (2, 6, 2, 3, 10, 12), (3, 0, 2, 1, 6, 5), (2, 2, 2, 2, 130, 9)],
                         ids=str)
@pytest.mark.parametrize("use_position", [False, True], ids=["counter", "positions"])
def test_rotary_variant_matches_the_torch_ops(shape, dtype, use_position):
    # q's and k's heads rotated on the way (x cos + rotate_half(x) sin, rounded per op as eager rounds), k's into
    # the cache, q's returned; heads_q 0 is k alone. bf16 within a rounding or two of the operands' scale (|x|
    # < 4 here): the interpreter's fp32 -> bf16 conversion truncates where a GPU rounds to nearest
    # (codegen/README.md), three times per value; the GPU lane checks bf16 bitwise.
    b, hq, hk, n, d, cache_len = shape
    keys, values, x, cos, sin, v, length = _rope_case(b, hq, hk, n, d, cache_len, dtype, start=cache_len - n,
                                                      shared_positions=b == 3)
    pos = torch.arange(n) + length if use_position else None
    got = [keys.clone(), values.clone(), length.clone()]
    want = [keys.clone(), values.clone(), length.clone()]
    q = C.rope_run(got[0], got[1], x, cos, sin, v, pos, None if use_position else got[2], hq, mode=1)
    q_want = cache_ops.rope_kv_cache_write_eager(want[0], want[1], x, cos, sin, v, pos,
                                                 None if use_position else want[2], hq)
    assert q.shape == (b, hq, n, d) and q.is_contiguous()
    if dtype == torch.bfloat16:
        for g_, w_ in ((q, q_want), (got[0], want[0])):
            torch.testing.assert_close(g_, w_, rtol=2 ** -6, atol=2 ** -4)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    else:
        for g_, w_ in zip([q, *got], [q_want, *want], strict=True):
            assert torch.equal(g_, w_)
    assert got[2].item() == (cache_len - n if use_position else cache_len)


@pytest.mark.parametrize("hq,hk,d,warps", [(32, 8, 64, 8), (32, 8, 128, 16), (6, 2, 8, 4)])
def test_a_batch_one_rotary_step_is_one_program(hq, hk, d, warps):
    # Llama-3's decode step (32 q + 8 k heads): one program of more warps, so the counter advances without an
    # arrival atomic; matches the torch ops bitwise in fp16.
    from effcompile.codegen import aot

    keys, values, x, cos, sin, v, length = _rope_case(1, hq, hk, 1, d, 16, torch.float16, start=5)
    with aot.record_launches() as seen:
        C.launch(keys, values, x, v, None, length, (cos, sin, hq))
    assert seen[0].grid == (1,) and seen[0].kwargs["ONE_PROGRAM"] and seen[0].kwargs["num_warps"] == warps
    got, want = [keys.clone(), values.clone(), length.clone()], [keys.clone(), values.clone(), length.clone()]
    q = C.rope_run(got[0], got[1], x, cos, sin, v, None, got[2], hq, mode=1)
    q_want = cache_ops.rope_kv_cache_write_eager(want[0], want[1], x, cos, sin, v, None, want[2], hq)
    for g_, w_ in zip([q, *got], [q_want, *want], strict=True):
        assert torch.equal(g_, w_)


def test_rotary_variant_refuses_what_eager_would_promote():
    keys, values, x, cos, sin, v, length = _rope_case(1, 2, 2, 1, 8, 4, torch.float16, start=0)
    assert "dtype" in C.rope_supported(keys, values, x, cos.float(), sin.float(), v, None, length, 2)
    assert "broadcast" in C.rope_supported(keys, values, x, cos[..., :4], sin[..., :4], v, None, length, 2)
    # Such a call runs the torch ops, which promote k to fp32 and then refuse to copy it into an fp16 cache:
    # the same error as eager, not a silently different result.
    with pytest.raises(RuntimeError, match="same dtype"):
        C.rope_run(keys, values, x, cos.float(), sin.float(), v, None, length, 2, mode=0)
    with pytest.raises(RuntimeError, match="same dtype"):
        cache_ops.rope_kv_cache_write_eager(keys, values, x, cos.float(), sin.float(), v, None, length, 2)
