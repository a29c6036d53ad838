"""Sparse-activation GEMV (float / int8 / int4 weights) vs its reference under TRITON_INTERPRET=1, odd shapes."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen import aot
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.codegen.kernels import sparse_gemv as S
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler import sparse_ops

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _weights(fmt, n, k, dtype, gen, group=32):
    w = (torch.randn(n, k, generator=gen) / 20).to(dtype)
    if fmt == "float":
        return sl.to_input_major(w, None, None, "float", 0) + (0,)
    group = 0 if fmt == "int8" else group
    qw = qops.quantize_weight(w, fmt, group)
    return sl.to_input_major(qw.qweight, qw.scales, qw.zeros, fmt, group) + (group,)


def _case(fmt, n, k, m, dtype, *, per_channel=False, bias=True, seed=0, sparsity=0.5, group=32):
    gen = torch.Generator().manual_seed(seed)
    wt, s, z, group = _weights(fmt, n, k, dtype, gen, group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q = torch.quantile(x.float().abs().flatten(), sparsity).item() if sparsity else 0.0
    t = (torch.full((k,), q) * (0.5 + torch.rand(k, generator=gen))) if per_channel else torch.tensor(q)
    # Thresholds the activation dtype represents: the interpreter rounds fp32 -> bf16 unlike torch (1 ulp),
    # which flips a channel sitting at the threshold (test_threshold_compared_in_activation_dtype covers that).
    t = t.to(dtype).float()
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return (x, t, wt, s, z, b, fmt, group)


def _check(args, split_k=None, config=None):
    got = S.launch(*args, split_k=split_k, config=config)
    want = S.reference(*args)
    assert got.shape == want.shape and got.dtype == args[0].dtype
    err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    assert err <= TOL[args[0].dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_kernel_each_format_dtype_batch(fmt, m, dtype):
    _check(_case(fmt, 94, 288, m, dtype, seed=m))  # N = 94 (even, not a block multiple), K = 9 * 32


@pytest.mark.parametrize("fmt", ["float", "int4"])
def test_odd_shapes_per_channel_thresholds_and_split_k(fmt):
    _check(_case(fmt, 246, 800, 3, torch.float32, per_channel=True, seed=3), split_k=3)


@pytest.mark.parametrize("block_k", [32, 256])
@pytest.mark.parametrize("group", [64, 128])
def test_int4_groups_against_k_tiles(group, block_k):
    # The int4 branch scales each K chunk's partial sums by one group's scale: chunks smaller than a group
    # (32 < 64, 128), larger ones (256, cut to the group) and a K split that ends inside a tile.
    _check(_case("int4", 94, 640, 3, torch.float16, group=group, seed=group), split_k=3,
           config=plan.Config(128, block_k, 4, 2))


def test_threshold_compared_in_activation_dtype():
    # fp32 thresholds just below |x| that round back up to |x| in fp16: the reference (|x| > t.to(x.dtype))
    # zeroes those channels, a kernel comparing in fp32 would keep them (seen on an H200; bf16 is checked
    # there only, since the interpreter truncates fp32 -> bf16 where GPUs round).
    x, t, *rest = _case("float", 64, 512, 1, torch.float16, per_channel=True, seed=7)
    t = x[0].float().abs() * (1 - 2.0**-12)
    t[1::2] = 1e9  # half the channels zeroed outright
    _check((x, t, *rest))


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_no_zero_and_all_zero_activations(sparsity):
    args = _case("int8", 70, 256, 2, torch.float32, sparsity=0.0)
    if sparsity == 1.0:
        args = (args[0], torch.tensor(1e9), *args[2:])  # every input zeroed: the bias alone
        torch.testing.assert_close(S.launch(*args), args[5].expand(2, -1).contiguous())
    _check(args)


def test_dense_rule_and_path_counts(monkeypatch):
    args = _case("float", 32, 64, 2, torch.float32)
    assert S.supported(args[0], args[2], "float", False) is None
    assert "dense path" in S.supported(torch.randn(9, 64), args[2], "float", False)  # quantized: a GEMM
    assert "prefill" in S.supported(torch.randn(1, 5, 64), args[2], "float", True)
    assert S.supported(torch.randn(1, 1, 64), args[2], "float", True) is None
    before = dict(cg_ops.PATH_COUNTS[S.NAME])
    S.run(*args, "lbl", False, cg_ops.MODE_AUTO)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    S.run(*args, "lbl", False, cg_ops.MODE_AUTO)
    after = cg_ops.PATH_COUNTS[S.NAME]
    assert after["triton"] == before.get("triton", 0) + 1 and after["torch"] == before.get("torch", 0) + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_gemm_past_the_decode_rows(fmt, dtype):
    # Past DECODE_MAX_ROWS (a prefill) quantized weights take the kernel as a GEMM over M tiles, which decodes the
    # packed rows in registers (the eager path dequantizes the whole weight per call). 70 rows: a partial third
    # M tile of 32; N = 94 and K = 288 as above, per-channel thresholds.
    args = _case(fmt, 94, 288, 70, dtype, per_channel=True, seed=11)
    assert S.supported(args[0], args[2], fmt, False) is None
    with aot.record_launches() as seen:
        S.launch(*args)
    assert seen[0].grid[2] == 2 and seen[0].kwargs["BLOCK_M"] == 64  # M tiles: the GEMM
    got = S.launch(*args)
    want = S.reference(*args)
    err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    assert got.shape == want.shape and err <= TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_only_prefill_runs_unthresholded_in_the_kernel(fmt):
    # decode_only thresholds leave a prefill's input as it is: the GEMM skips the compare (THRESHOLD False) and
    # reads every row, also for a prompt of fewer rows than DECODE_MAX_ROWS; decode steps still threshold.
    x, t, *rest = _case(fmt, 64, 256, 1, torch.float32, seed=5)
    prompt = torch.randn(1, 5, 256, generator=torch.Generator().manual_seed(1))
    assert S.supported(prompt, rest[0], fmt, True) is None
    with aot.record_launches() as seen:
        S.run(prompt, t, *rest, "l", True, cg_ops.MODE_TRITON)
        S.run(prompt[:, :1], t, *rest, "l", True, cg_ops.MODE_TRITON)  # a decode step
    assert [(lc.kwargs["THRESHOLD"], lc.grid[2]) for lc in seen] == [(False, 1), (True, 1)]
    got = S.run(prompt, t, *rest, "l", True, cg_ops.MODE_TRITON)
    dense = S.reference(prompt, torch.tensor(0.0), *rest)  # nothing thresholded
    thresholded = S.reference(prompt, t, *rest)
    torch.testing.assert_close(got, S.reference(prompt, t, *rest, "l", True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert (got - thresholded).abs().max() > 1e-3  # the thresholds were not applied
    assert S.kind_for(5, fmt) == "sparse-gemv" and S.kind_for(9, fmt) == "sparse-gemm"
    assert S.kind_for(None, fmt) == "sparse-gemv|sparse-gemm" and S.kind_for(9, "float") == "dense"


@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_unneeded_weight_rows_are_skipped_up_to_skip_rows_max(m):
    # Weight rows of channels no activation row keeps hold NaN: up to SKIP_ROWS_MAX rows the masked path never
    # reads them (a finite result equal to the reference on clean weights); past it every row is read (the
    # NaN shows) and only x is thresholded, which costs less than the keep reduction (sparse_gemv.SKIP_ROWS_MAX).
    x, t, wt, *rest = _case("float", 64, 256, m, torch.float32, seed=m, bias=False)
    x[:, ::7] = 0  # channels no row keeps, at any row count
    want = S.reference(x, t, wt, *rest)
    unneeded = ~sparse_ops.keep_mask(x, t).any(0)
    poisoned = wt.clone()
    poisoned[unneeded] = float("nan")
    got = S.launch(x, t, poisoned, *rest, config=plan.Config(64, 32, 4, 1))  # a dot tile: the masked path
    if m <= S.SKIP_ROWS_MAX:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert got.isnan().any()


def test_measured_sparsity_counts_on_the_kernel_path():
    args = _case("float", 32, 256, 1, torch.float32, sparsity=0.5)
    with sparse_ops.measure_sparsity() as got:
        S.run(*args, "layer", False, cg_ops.MODE_TRITON)
    assert got["layer"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_eager_gather_path_equals_reference(fmt):
    # The CPU path multiplies only the active weight rows: same result as the dense definition.
    for m in (1, 3, 12):  # 12 rows: the dense rule
        args = _case(fmt, 40, 96, m, torch.float32, seed=m)
        got = sl.sparse_linear_eager(*args, "l", False)
        torch.testing.assert_close(got, S.reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,sparsity,gathers", [("float", 0.5, False), ("float", 0.9, True), ("int8", 0.5, True),
                                                   ("int4", 0.5, True)])
def test_eager_path_gathers_float_rows_only_when_few_are_needed(fmt, sparsity, gathers, monkeypatch):
    # A float gather copies the rows it reads: it pays only under sl.FLOAT_GATHER_MAX of them (half the rows
    # needed ran 2-4x slower than the dense matmul on the CPU box); quantized rows are gathered so that only
    # those are dequantized.
    args = _case(fmt, 40, 96, 1, torch.float32, seed=3, sparsity=sparsity)
    want = S.reference(*args)
    calls = []
    rows_of = sl.rows_of
    monkeypatch.setattr(sl, "rows_of", lambda *a: calls.append(len(a) > 6 and a[6] is not None) or rows_of(*a))
    torch.testing.assert_close(sl.sparse_linear_eager(*args, "l", False), want, rtol=1e-5, atol=1e-5)
    assert calls == [gathers]


def test_input_major_layout_round_trip():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 64, generator=gen)
    qw = qops.quantize_weight(w, "int4", 32)
    wt, s, z = sl.to_input_major(qw.qweight, qw.scales, qw.zeros, "int4", 32)
    assert wt.shape == (64, 5) and s.shape == (2, 10)
    torch.testing.assert_close(sl.rows_of(wt, s, z, "int4", 32, torch.float32).t(),
                               qops.dequantize(*qw[:3], "int4", 32))
    with pytest.raises(ValueError, match="even out_features"):
        sl.to_input_major(qops.quantize_weight(torch.randn(7, 64), "int4", 32).qweight, None, None, "int4", 32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_fma_decode_configs(fmt, m, dtype):
    # fma=True: products summed over K in registers over the real rows (BLOCK_M 1 / 4 / 8, not 16);
    # per-channel thresholds, K split in 3 (K = 9 * 32 is not a multiple of the 64-wide chunk).
    config = plan.Config(64, 64, 4, 2, 3, fma=True)
    assert plan.uses_fma(m, config)
    _check(_case(fmt, 94, 288, m, dtype, per_channel=m == 3, seed=m), config=config)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["float", "int8"])
@pytest.mark.parametrize("sparsity,per_channel,splits", [(0.0, False, None), (0.5, True, 3), (0.9, False, 2)])
def test_one_row_masked_path_sums_over_k_after_the_loop(fmt, sparsity, per_channel, splits, dtype, stages):
    # One row, float / int8, compact=False: every chunk visited with skipped rows masked, products kept per
    # [k, output] and summed once after the loop (session 13); odd N, K = 9 x 32 split unevenly. stages 2:
    # the next chunk's x, thresholds and kept rows prefetched in registers, past each split's end masked off.
    from effcompile.codegen import aot

    config = plan.Config(64, 32, 4, stages, splits, fma=True)
    _check(_case(fmt, 101, 288, 1, dtype, per_channel=per_channel, sparsity=sparsity, seed=7), config=config)
    with aot.record_launches() as seen:
        S.launch(*_case(fmt, 101, 288, 1, dtype, seed=7), config=config)
    assert seen[0].kwargs["PREFETCH"] == (stages == 2) and not seen[0].kwargs["COMPACT"]
    if sparsity == 0.9:  # every activation under its threshold: the bias alone
        args = _case(fmt, 101, 288, 1, dtype, seed=7)
        args = (args[0], torch.tensor(1e9), *args[2:])
        torch.testing.assert_close(S.launch(*args, config=config), args[5][None, :])


def test_fma_all_zero_activations_leave_the_bias():
    args = _case("int4", 70, 256, 2, torch.float32)
    args = (args[0], torch.tensor(1e9), *args[2:])
    got = S.launch(*args, config=plan.Config(128, 32, 4, 2, 2, fma=True))
    torch.testing.assert_close(got, args[5].expand(2, -1).contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,splits,per_channel,sparsity", [(200, None, False, 0.5), (96, 3, True, 0.5),
                                                            (136, 2, False, 0.0), (136, 3, True, 0.9),
                                                            (200, 3, False, 1.0)])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_int4_one_row_compacted_word_path(n, splits, per_channel, sparsity, dtype, stages, monkeypatch):
    # One row, int4, fma: kept channels are compacted per group and read as int32 words (8 outputs each).
    # N a multiple of 8 but not of the 64-output tile, K = 9 groups of 32 split in 2 or 3 (whole groups),
    # chunks of 16 kept rows (a group keeps 0..32), nothing / everything / 90 % skipped; stages 2 prefetches
    # the next chunk in registers, stages 3 its kept-row indices a chunk earlier still.
    lists = _spy_lists(monkeypatch)
    args = _case("int4", n, 288, 1, dtype, per_channel=per_channel, seed=n, sparsity=sparsity)
    _check(args, config=plan.Config(64, 16, 4, stages, splits, fma=True, compact=True))
    assert lists, "the compacted word path did not run"


@pytest.mark.parametrize("sparsity", [0.0, 0.3])
@pytest.mark.parametrize("stages", [2, 3])
def test_int4_compacted_groups_of_many_chunks(sparsity, stages):
    # Groups of 128 (up to 8 chunks of 16 kept rows a group): the prefetch and the indices loaded two chunks
    # ahead (stages 3) run through whole groups, and off each group's end.
    from effcompile.codegen import aot

    args = _case("int4", 72, 384, 1, torch.float16, seed=stages, sparsity=sparsity, group=128)
    config = plan.Config(64, 16, 4, stages, 2, fma=True, compact=True)
    _check(args, config=config)
    with aot.record_launches() as seen:
        S.launch(*args, config=config)
    assert seen[0].kwargs["COMPACT"] and seen[0].kwargs["IDX_AHEAD"] == (stages == 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["float", "int8"])
@pytest.mark.parametrize("n,k,splits,per_channel,sparsity", [(93, 300, None, False, 0.5), (200, 640, 3, True, 0.5),
                                                              (136, 256, 2, False, 0.0), (93, 640, 3, True, 1.0)])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_one_row_compacted_path_float_and_int8(fmt, n, k, splits, per_channel, sparsity, dtype, stages, monkeypatch):
    # float / int8 rows compacted per segment of 128 channels: K = 300 (the last segment partial), 640 split
    # in 3 (segments of 128 per split), odd N; stages 2 prefetches the next chunk.
    lists = _spy_lists(monkeypatch)
    args = _case(fmt, n, k, 1, dtype, per_channel=per_channel, seed=k, sparsity=sparsity)
    _check(args, config=plan.Config(64, 16, 4, stages, splits, fma=True, compact=True))
    assert lists, "the compacted path did not run"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stages", [1, 2, 3, 5])
@pytest.mark.parametrize("group,n,k,splits,per_channel,sparsity", [
    (32, 96, 288, None, False, 0.5),  # 9 groups: two compaction steps of 8 segments
    (32, 136, 288, 3, True, 0.5),  # split in 3 (3 groups each), per-channel thresholds
    (128, 72, 384, 2, False, 0.3),  # up to 8 chunks a group, splits of 1-2 groups
    (64, 96, 320, 2, False, 0.0),  # nothing skipped: every chunk full, no pads
    (32, 200, 288, 3, True, 0.9),  # most groups keep 0-4 channels: runs of one padded chunk, or none
    (32, 96, 288, 2, False, 1.0)])  # everything skipped: an empty list, the bias alone
def test_int4_flat_compacted_path(group, n, k, splits, per_channel, sparsity, stages, dtype):
    # Config.flat: the whole K split compacted first (each group's kept channels padded to whole chunks of 16),
    # then one loop over the chunks, prefetching stages - 1 of them across group boundaries and loading a
    # group's scales when the chunk's group changes.
    from effcompile.codegen import aot

    args = _case("int4", n, k, 1, dtype, per_channel=per_channel, seed=n + stages, sparsity=sparsity, group=group)
    config = plan.Config(64, 16, 4, stages, splits, fma=True, compact=True, flat=True)
    _check(args, config=config)
    with aot.record_launches() as seen:
        S.launch(*args, config=config)
    kw = seen[0].kwargs
    assert kw["COMPACT"] and kw["FLAT"] and kw["PREFETCH"] == stages - 1 and not kw["IDX_AHEAD"]
    if sparsity == 1.0:
        torch.testing.assert_close(S.launch(*args, config=config), args[5][None, :], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["float", "int8"])
@pytest.mark.parametrize("n,k,splits,per_channel,sparsity,stages", [
    (93, 300, None, False, 0.5, 2),  # the last segment partial, no padding between segments
    (93, 1100, None, True, 0.5, 4),  # 9 segments: two compaction steps
    (200, 640, 3, False, 0.9, 3),  # split in 3, chunks spanning segments
    (136, 256, 2, False, 0.0, 1),
    (93, 640, 3, True, 1.0, 5)])
def test_flat_compacted_path_float_and_int8(fmt, n, k, splits, per_channel, sparsity, stages, dtype):
    config = plan.Config(64, 16, 4, stages, splits, fma=True, compact=True, flat=True)
    _check(_case(fmt, n, k, 1, dtype, per_channel=per_channel, seed=k, sparsity=sparsity), config=config)


def test_flat_compaction_pads_each_int4_group_to_whole_chunks(monkeypatch):
    # The list itself: each group's kept channels in order, then -1 up to a multiple of the chunk (16), groups
    # in order, nothing for a group that keeps nothing; a float list has no pads.
    x = torch.zeros(1, 96)
    x[0, [1, 5, 31]] = 1.0  # group 0 keeps 3 channels
    x[0, 64:64 + 20] = 1.0  # group 2 keeps 20: a full chunk and 4 of the next; group 1 keeps none
    taken = []
    scratch = plan.scratch_lists
    monkeypatch.setattr(plan, "scratch_lists", lambda *a: taken.append(scratch(*a)) or taken[-1])
    for fmt, pads in (("int4", True), ("float", False)):
        args = _case(fmt, 64, 96, 1, torch.float32, group=32)
        args = (x, torch.tensor(0.5), *args[2:])
        _check(args, config=plan.Config(64, 16, 4, 2, None, fma=True, compact=True, flat=True))
        got = taken[-1][:96].tolist()
        kept = [1, 5, 31] + list(range(64, 84))
        want = ([1, 5, 31] + [-1] * 13 + list(range(64, 84)) + [-1] * 12) if pads else kept
        assert got[:len(want)] == want, fmt


def _spy_lists(monkeypatch) -> list:
    """Calls of launch_plan.scratch_lists (the compacted path's scratch) made from here on."""
    lists = []
    scratch = plan.scratch_lists
    monkeypatch.setattr(plan, "scratch_lists", lambda *a: lists.append(a) or scratch(*a))
    return lists


@pytest.mark.parametrize("fmt,n,m,fma,compact", [("int4", 94, 1, True, True), ("int4", 96, 2, True, True),
                                                  ("int4", 96, 1, False, True), ("float", 96, 2, True, True),
                                                  ("int8", 96, 1, False, True), ("float", 96, 1, True, False)])
def test_compacted_path_needs_a_compact_one_row_fma_config_and_whole_int4_words(fmt, n, m, fma, compact,
                                                                                 monkeypatch):
    # int4 N = 94 is not whole int32 words; 2 rows, a dot config or compact=False take the masked path, and
    # are right there.
    monkeypatch.setattr(plan, "scratch_lists", lambda *a: pytest.fail("compacted path taken"))
    _check(_case(fmt, n, 288, m, torch.float32), config=plan.Config(64, 32, 4, 1, 3, fma=fma, compact=compact))


def test_int4_flat_path_with_the_gated_epilogue():
    # Gate/up pairs (FuseGatedActivation) through the flat int4 path: the same GEMV, silu(gate) * up in the store.
    args = _case("int4", 96, 384, 1, torch.bfloat16, seed=5, group=128)
    config = plan.Config(64, 16, 4, 3, 2, fma=True, compact=True, flat=True)
    got = S.launch(*args, config=config, epilogue="silu_mul")
    torch.testing.assert_close(got, qops.apply_epilogue(S.launch(*args, config=config), "silu_mul"), rtol=1.6e-2,
                               atol=1e-6)
