"""Dequant-GEMV/GEMM Triton kernels vs the eager reference under TRITON_INTERPRET=1, odd shapes, each dtype."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl

from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import ops as qops

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(fmt, group, n, k, m, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / 20).to(dtype)
    qw = qops.quantize_weight(w, fmt, group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, qw, b


def _check(x, qw, b, **launch_kw):
    got = D.launch(x, *qw[:3], b, qw.fmt, qw.group_size, **launch_kw)
    want = D.reference(x, *qw[:3], b, qw.fmt, qw.group_size)
    assert got.shape == want.shape and got.dtype == x.dtype
    # Errors relative to the output's scale: the kernels accumulate in fp32 in another order.
    err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    assert err <= TOL[x.dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("m", [1, 3, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32)])
def test_gemv_odd_large_shape_fp32(fmt, group, m):
    # N = 781 (not a multiple of any block), K = 1824 = 57 * 32 (not a multiple of 64 or 128).
    _check(*_case(fmt, group, 781, 1824, m, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 8, 19])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_kernels_each_dtype(fmt, group, m, dtype):
    # m <= 8 runs the GEMV kernel, 19 the GEMM (partial M and N tiles, K = 3 * 128); batch 3 is above.
    _check(*_case(fmt, group, 71, 384, m, dtype, bias=m != 8, seed=m))


@pytest.mark.parametrize("m", [2, 20])
@pytest.mark.parametrize("block_k", [32, 256])
def test_int4_group_128_against_k_tiles(block_k, m):
    # The int4 branch scales each K chunk's partial sum by one group's scale: a chunk smaller than the
    # group (32), a larger one (256, cut to the group), and a K split that ends inside a tile.
    _check(*_case("int4", 128, 94, 640, m, torch.float16, seed=block_k), split_k=3,
           config=plan.Config(64, block_k, 4, 2))


def _spy_launches(monkeypatch, what) -> list:
    """A list that gets ``what(args, kwargs)`` of every kernel launch from here on (the launches still run)."""
    seen, real = [], cg_ops.jit_variant

    def spy(kernel, interpret):
        variant = real(kernel, interpret)

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append(what(args, kw))
                    return variant[grid](*args, **kw)
                return launch
        return _Grid()

    monkeypatch.setattr(cg_ops, "jit_variant", spy)
    return seen


@pytest.mark.parametrize("m", [1, 5, 24])
@pytest.mark.parametrize("splits", [1, 4])
def test_int4_tiles_that_divide_n_and_k_load_unmasked(m, splits, monkeypatch):
    # N and K multiples of the tile: the 16-bit int4 path drops its load masks (EVEN_NK); the rows are still
    # masked (m < the 16-row dot tile). fp16: under the interpreter bf16 dots run in fp32, another branch.
    seen = _spy_launches(monkeypatch, lambda args, kw: kw)
    config = plan.Config(32, 64, 4, 2, splits)
    _check(*_case("int4", 64, 96, 512, m, torch.float16, seed=m + splits), config=config)
    assert [kw["EVEN_NK"] for kw in seen] == [True] and seen[0]["DOT_DT"] == tl.float16
    seen.clear()
    _check(*_case("int4", 64, 94, 512, m, torch.float16, seed=m), config=config)  # N = 94: masked
    assert [kw["EVEN_NK"] for kw in seen] == [False]


@pytest.mark.parametrize("n,k,group", [(96, 512, 64), (94, 640, 32), (71, 768, 128)], ids=str)
@pytest.mark.parametrize("m", [1, 8, 24])
def test_int4_scale_words_match_the_reference(n, k, group, m, monkeypatch):
    # Config.scale_words: scales and zeros read as int32 words of two groups, the chunk's half picked by the
    # parity of its group (even and odd groups, masked and unmasked tiles, decode and prefill, K split at 3).
    seen = _spy_launches(monkeypatch, lambda args, kw: args[2].dtype)  # the scales as the kernel gets them
    config = plan.Config(32, min(64, group), 4, 2, 3, scale_words=True)  # one group a chunk (GPC 1)
    _check(*_case("int4", group, n, k, m, torch.float16, seed=m + group), config=config)
    assert seen == [torch.int32]
    seen.clear()
    _check(*_case("int4", 64, 96, 320, m, torch.float16, seed=m), config=config)  # K / G = 5, odd: plain loads
    assert seen == [torch.float16]


@pytest.mark.slow
def test_gemm_odd_large_shape_bf16():
    _check(*_case("int4", 32, 781, 1824, 37, torch.bfloat16))


def test_kernel_choice_and_leading_dims():
    x, qw, b = _case("int8", 0, 33, 64, 6, torch.float32)
    x3 = x.view(2, 3, 64)
    out = D.launch(x3, *qw[:3], b, "int8", 0)
    assert out.shape == (2, 3, 33)
    torch.testing.assert_close(out, D.reference(x3, *qw[:3], b, "int8", 0), rtol=1e-5, atol=1e-5)
    assert D.kind_for(8) == "dequant-gemv" and D.kind_for(9) == "dequant-gemm" and D.kind_for(None) == "dequant-gemm"


def test_op_paths_are_counted(monkeypatch):
    x, qw, b = _case("int4", 64, 48, 128, 2, torch.float32)
    before = dict(cg_ops.PATH_COUNTS[D.NAME])
    op = cg_ops.op_for(D.NAME)
    tri = op(x, *qw[:3], b, "int4", 64, "none", cg_ops.MODE_AUTO)  # TRITON_INTERPRET=1 -> Triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    eager = op(x, *qw[:3], b, "int4", 64, "none", cg_ops.MODE_AUTO)  # CPU without interpreter -> eager path
    after = cg_ops.PATH_COUNTS[D.NAME]
    assert after["triton"] == before.get("triton", 0) + 1 and after["torch"] == before.get("torch", 0) + 1
    # The eager path runs torch's packed int4 kernel on x rounded to bf16 (ops.BF16_ACTIVATIONS): ~0.3 % apart.
    assert ((tri - eager).norm() / tri.norm()).item() < 1e-2


def test_unsupported_inputs_use_the_eager_path():
    x, qw, _ = _case("int8", 0, 16, 32, 2, torch.float32)
    assert D.supported(x.double(), qw.qweight, "int8", 0) is not None
    assert D.supported(x, qw.qweight, "int3", 0) is not None
    assert D.supported(x, qw.qweight, "int8", 0, act="fp8") is not None  # not a pairing ops.ACTIVATIONS has
    assert D.supported(x, qw.qweight, "int8", 0) is None


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 64)])
def test_split_k_partial_sums_add_up(fmt, group, splits):
    # Decode on a GPU splits K over programs that add fp32 partial sums atomically; force it here.
    # K = 1152 = 4.5 blocks of 256: the last split is shorter than the others.
    x, qw, b = _case(fmt, group, 45, 1152, 2, torch.float32, seed=splits)
    got = D.launch(x, *qw[:3], b, fmt, group, split_k=splits)
    want = D.reference(x, *qw[:3], b, fmt, group)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 128)])
def test_fma_decode_configs(fmt, group, m, dtype):
    # fma=True: products summed over K in registers, BLOCK_M = the rows padded to a power of two (1, 4, 8)
    # instead of one 16-row dot tile; K split in 3 with a chunk (64) smaller than the int4 group of 128.
    config = plan.Config(64, 64, 4, 2, 3, fma=True)
    assert plan.uses_fma(m, config) and plan.block_m(m, config) == triton_pow2(m)
    _check(*_case(fmt, group, 94, 640, m, dtype, bias=m != 3, seed=m), config=config)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("group,split", [(32, 3), (128, 1)])
def test_int4_one_row_prefetch_matches_plain(stages, group, split):
    # One-row int4 fma with stages >= 2 double-buffers words, x, scales and zeros in registers (PREFETCH):
    # 64-wide chunks, groups of 32 (a new group per chunk) and 128 (two chunks per group), 1 or 3 splits,
    # N = 94 and K = 640 (the last split's prefetch runs off its end: masked).
    from effcompile.codegen import aot

    x, qw, b = _case("int4", group, 94, 640, 1, torch.bfloat16, seed=stages)
    config = plan.Config(64, 64, 4, stages, split, fma=True)
    _check(x, qw, b, config=config)
    with aot.record_launches() as seen:
        D.launch(x, *qw[:3], b, "int4", group, config=config)
    assert seen[0].kwargs["PREFETCH"] == (stages >= 2)


def test_fma_config_is_ignored_for_prefill():
    # Prefill always dots: the fma flag of a (decode) config does not reach a 19-row launch.
    config = plan.Config(32, 64, 4, 2, fma=True)
    assert not plan.uses_fma(19, config) and plan.block_m(19, config) == 32
    _check(*_case("int4", 64, 45, 256, 19, torch.float16), config=config)


def triton_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


@pytest.mark.parametrize("group,block_k,n,k,split,stages", [
    (32, 256, 94, 640, 1, 1),    # 8 groups per chunk; K = 2.5 chunks: the last one's upper groups are masked
    (64, 256, 781, 1216, 3, 2),  # 4 per chunk, 3 splits (the last split short), prefetch running off the end
    (128, 512, 64, 1536, 2, 2),  # 4 per chunk, even tiles; each split's prefetch reaches the other's chunk
    (128, 256, 45, 384, 1, 1),   # 2 per chunk, N under one tile
    (64, 256, 96, 2048, 2, 2),   # even tiles, 4 chunks a split: unmasked loads, the last prefetch re-reads
    (128, 256, 64, 1024, 1, 1),  # even tiles without prefetch
])
def test_int4_one_row_chunks_span_several_groups(group, block_k, n, k, split, stages):
    # One-row int4 fma chunks longer than a group (GPC groups each, [GPC, 1, N] scales and zeros), so an
    # output's codes in a chunk are block_k / 2 contiguous bytes instead of at most group / 2.
    from effcompile.codegen import aot

    x, qw, b = _case("int4", group, n, k, 1, torch.bfloat16, seed=group + n)
    config = plan.Config(32, block_k, 4, stages, split, fma=True)
    _check(x, qw, b, config=config)
    with aot.record_launches() as seen:
        D.launch(x, *qw[:3], b, "int4", group, config=config)
    assert seen[0].kwargs["GPC"] == block_k // group and seen[0].kwargs["BLOCK_K"] == block_k
    assert seen[0].kwargs["EVEN_NK"] == (n % 32 == 0 and k % block_k == 0)
    assert seen[0].kwargs["X_PAIRS"]  # bf16 x, two values a load


@pytest.mark.parametrize("dtype,offset,pairs", [
    (torch.bfloat16, 0, True), (torch.bfloat16, 1, False),  # a view 2 bytes into its storage: one value a load
    (torch.bfloat16, 2, True), (torch.float16, 0, False), (torch.float32, 0, False)])
def test_int4_one_row_x_pairs_only_where_bf16_x_is_4_byte_aligned(dtype, offset, pairs):
    from effcompile.codegen import aot

    n, k, group = 96, 512, 64
    x, qw, b = _case("int4", group, n, k, 1, dtype, seed=offset)
    x = torch.cat([torch.zeros(offset, dtype=dtype), x.flatten()])[offset:].view(1, k)  # same values, shifted storage
    config = plan.Config(32, 256, 4, 2, 2, fma=True)
    _check(x, qw, b, config=config)
    with aot.record_launches() as seen:
        D.launch(x, *qw[:3], b, "int4", group, config=config)
    assert seen[0].kwargs["GPC"] == 4 and seen[0].kwargs["X_PAIRS"] == pairs


def test_int4_chunks_stay_inside_a_group_where_a_chunk_is_scaled_as_a_whole(monkeypatch):
    # Several-row fma tiles and fp32 dots (bf16 under the interpreter) scale a chunk's partial sum: a chunk
    # longer than the group is cut to one group there. The same dot config on a GPU (bf16 dots) spans groups.
    from effcompile.codegen import aot

    seen = _spy_launches(monkeypatch, lambda args, kw: (kw["GPC"], kw["BLOCK_K"], kw["DOT_DT"]))
    x, qw, b = _case("int4", 32, 94, 640, 3, torch.bfloat16)
    fma, dot = plan.Config(32, 256, 4, 2, 2, fma=True), plan.Config(32, 256, 4, 2, 2)
    _check(x, qw, b, config=fma)
    _check(x, qw, b, config=dot)
    assert seen == [(1, 32, tl.float32), (1, 32, tl.float32)]
    with aot.record_launches() as gpu:  # the launch a GPU would get
        D.launch(x, *qw[:3], b, "int4", 32, config=dot)
    assert (gpu[0].kwargs["GPC"], gpu[0].kwargs["BLOCK_K"], gpu[0].kwargs["DOT_DT"]) == (8, 256, tl.bfloat16)


@pytest.mark.parametrize("group,block_k,n,k,m,split", [
    (32, 128, 94, 640, 3, 1),    # 4 groups per chunk, K = 5 chunks; masked N
    (64, 256, 781, 1216, 8, 3),  # 4 per chunk, 3 splits, the last chunk short
    (32, 64, 64, 256, 2, 1),     # 2 per chunk, even tiles (EVEN_NK)
])
def test_int4_16_bit_dot_tiles_span_several_groups(group, block_k, n, k, m, split):
    # fp16 runs the 16-bit dot branch under the interpreter too (bf16 dots run in fp32 there): its chunks may
    # span GPC whole groups, dequantized per group as [N, GPC, G / 2] and reshaped for the dot.
    from effcompile.codegen import aot

    x, qw, b = _case("int4", group, n, k, m, torch.float16, seed=group + m)
    config = plan.Config(32, block_k, 4, 2, split)
    _check(x, qw, b, config=config)
    with aot.record_launches() as seen:
        D.launch(x, *qw[:3], b, "int4", group, config=config)
    assert seen[0].kwargs["GPC"] == block_k // group and seen[0].kwargs["EVEN_NK"] == (n % 32 == 0 and k % block_k == 0)
