"""CPU embedding-bag GEMV (float / int8 / int4) vs sparse_linear's reference: odd shapes, dtypes, batch 1-8, prefill."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import cpu_bag_gemv as B
from effcompile.codegen.kernels import cpu_float_gemv
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.testing import tiny_hf

CASES = [("float", 0), ("int8", 0), ("int4", 32)]


@pytest.fixture(autouse=True)
def _float_bags_at_test_sizes(monkeypatch):
    """The shapes here are tiny; production sends float weights under 2M elements to sgemv instead."""
    monkeypatch.setattr(B, "FLOAT_BAG_MIN_WEIGHTS", 0)


def _no_row_kernel(monkeypatch):
    """As where no C compiler is: float / int8 calls take torch's float / byte bag."""
    for attr, value in (("decided", True), ("fn", None), ("why", "CPU float GEMV kernel unavailable: test")):
        monkeypatch.setattr(cpu_float_gemv.KERNEL, attr, value)


def _path(fmt, m, rows, kept_share) -> str:
    """Which path B.run takes: dense beyond max_rows; float calls the C kernel where it builds (one fp32 row dense
    past FLOAT_BAG_MAX_KEPT kept), else the bag (fp32 float ones dense past that share of all kept entries)."""
    limit = B.FLOAT_BAG_MAX_KEPT if rows.dtype == torch.float32 else float("inf")
    if m > B.max_rows(fmt, rows.dtype):
        return "dense"
    if B.row_kernel(fmt, rows.dtype, m):
        return "dense" if fmt == "float" and m == 1 and kept_share > limit else "kernel"
    return "dense" if fmt == "float" and kept_share > limit else "bag"


def _weights(fmt, group, k, n, dtype=torch.float32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k * n)) / k**0.5
    if fmt == "float":
        return sl.to_input_major(w.to(dtype), None, None, "float", 0)
    qw = qops.quantize_weight(w, fmt, group)
    return sl.to_input_major(qw.qweight, qw.scales, qw.zeros, fmt, group)


def _input(m, k, zero_frac, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[torch.rand(m, k, generator=g) < zero_frac] = 0
    return x.to(dtype)


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("k,n", [(96, 40), (160, 72), (64, 10)])
def test_pack_round_trip(fmt, group, k, n):
    wt, _, _ = _weights(fmt, group, k, n)
    rows = B.pack(wt, fmt)
    assert torch.equal(B.unpack(rows, fmt), wt)
    assert B.out_features(rows, fmt) == n


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("k,n", [(96, 40), (160, 74)])
@pytest.mark.parametrize("m", [1, 3, 8, 17])  # 17 rows: the dense (prefill) path
@pytest.mark.parametrize("zero_frac", [0.0, 0.6, 1.0])  # no zeros, sparse, all zeros
@pytest.mark.parametrize("thresholded", [False, True])
@pytest.mark.parametrize("threads", [1, 3])  # 3 threads: a one-row call splits each row's kept inputs over 3 bags
def test_matches_reference(fmt, group, k, n, m, zero_frac, thresholded, threads, monkeypatch):
    _check_reference(fmt, group, k, n, m, zero_frac, thresholded, threads, monkeypatch)


@pytest.mark.parametrize("k,n", [(96, 40), (160, 74)])
@pytest.mark.parametrize("zero_frac", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("thresholded", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_one_fp32_float_row_without_the_c_kernel_takes_the_float_bag(k, n, zero_frac, thresholded, threads,
                                                                       monkeypatch):
    _no_row_kernel(monkeypatch)
    _check_reference("float", 0, k, n, 1, zero_frac, thresholded, threads, monkeypatch)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("zero_frac", [0.0, 0.6])
@pytest.mark.parametrize("thresholded", [False, True])
def test_int8_without_the_c_kernel_takes_the_byte_bag(m, zero_frac, thresholded, monkeypatch):
    _no_row_kernel(monkeypatch)
    _check_reference("int8", 0, 160, 74, m, zero_frac, thresholded, 3, monkeypatch)


def _check_reference(fmt, group, k, n, m, zero_frac, thresholded, threads, monkeypatch):
    monkeypatch.setattr(B, "ROW_SPLIT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    wt, s, z = _weights(fmt, group, k, n)
    rows = B.pack(wt, fmt)
    x = _input(m, k, zero_frac, torch.float32, seed=m)
    bias = torch.randn(n)
    thr = torch.tensor(0.4) if thresholded else None
    before = dict(cg_ops.PATH_COUNTS[B.NAME])
    got = B.run(x, thr, rows, s, z, bias, fmt, group, "t", False)
    want = sl.reference(x, thr if thresholded else torch.tensor(0.0), wt, s, z, bias, fmt, group, "t", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    path = _path(fmt, m, rows, float((x.abs() > (thr if thresholded else 0)).float().mean()))
    assert cg_ops.PATH_COUNTS[B.NAME][path] == before.get(path, 0) + 1


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(fmt, group, dtype):
    wt, s, z = _weights(fmt, group, 128, 48, dtype)
    rows = B.pack(wt, fmt)
    x = _input(4, 128, 0.5, dtype)
    got = B.run(x, torch.tensor(0.2), rows, s, z, None, fmt, group, "t", False)
    want = sl.reference(x.float(), torch.tensor(0.2), wt.float() if fmt == "float" else wt, s, z, None, fmt, group,
                        "t", False)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_decode_only_prefill_is_dense_and_unthresholded():
    wt, s, z = _weights("int8", 0, 64, 32)
    rows = B.pack(wt, "int8")
    x = _input(1, 64, 0.0, torch.float32).expand(5, 64).contiguous().view(1, 5, 64)  # prefill-shaped
    before = cg_ops.PATH_COUNTS[B.NAME]["dense"]
    got = B.run(x, torch.tensor(10.0), rows, s, z, None, "int8", 0, "t", True)  # would zero everything
    torch.testing.assert_close(got, qops.reference(x, wt.t(), s, None, None, "int8", 0), rtol=1e-5, atol=1e-5)
    assert cg_ops.PATH_COUNTS[B.NAME]["dense"] == before + 1


@pytest.mark.parametrize("fmt", ["float", "int8"])
def test_row_splits_stay_inside_their_row_when_a_row_keeps_fewer_inputs_than_splits(fmt, monkeypatch):
    # Two rows keeping 1 and 5 inputs, cut into 3 bags each: row 0's cuts (0, 1, 2) must stop at its one input,
    # or its last bag reads row 1's first input.
    monkeypatch.setattr(B, "ROW_SPLIT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    wt, s, z = _weights(fmt, 0, 16, 8)
    x = torch.zeros(2, 16)
    x[0, 3] = 1.5
    x[1, [0, 2, 5, 9, 15]] = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    got = B.run(x, None, B.pack(wt, fmt), s, z, None, fmt, 0, "t", False)
    want = sl.reference(x, torch.tensor(0.0), wt, s, z, None, fmt, 0, "t", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("float_kernel", [True, False])
def test_a_float_call_keeping_most_inputs_runs_the_dense_matmul(float_kernel, monkeypatch):
    # A float bag (or the C kernel in its place) pays only when few inputs are kept (FLOAT_BAG_MAX_KEPT): per call,
    # more kept -> dense matmul of the thresholded x, fewer -> the row-skipping path; both equal the reference.
    if not float_kernel:
        _no_row_kernel(monkeypatch)
    wt, _, _ = _weights("float", 0, 200, 48)
    rows = B.pack(wt, "float")
    for zero_frac, path in ((0.2, "dense"), (0.7, _path("float", 1, rows, 0.3))):
        x = _input(1, 200, zero_frac, torch.float32, seed=3)
        before = cg_ops.PATH_COUNTS[B.NAME][path]
        got = B.run(x, torch.tensor(0.0), rows, None, None, None, "float", 0, "t", False)
        torch.testing.assert_close(got, sl.reference(x, torch.tensor(0.0), wt, None, None, None, "float", 0, "t", False),
                                   rtol=1e-5, atol=1e-5)
        assert cg_ops.PATH_COUNTS[B.NAME][path] == before + 1, zero_frac


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("float_kernel", [True, False])
def test_a_half_float_call_skips_rows_however_many_inputs_it_keeps(dtype, float_kernel, monkeypatch):
    # FLOAT_BAG_MAX_KEPT is for fp32 weights only: a half-precision bag (or the C kernel) beats the dense matmul of
    # the input-major half weight with every input kept.
    if not float_kernel:
        _no_row_kernel(monkeypatch)
    path = "kernel" if B.row_kernel("float", dtype) else "bag"
    wt, _, _ = _weights("float", 0, 200, 48, dtype)
    x = _input(1, 200, 0.0, dtype, seed=3)
    before = cg_ops.PATH_COUNTS[B.NAME][path]
    got = B.run(x, torch.tensor(0.0), B.pack(wt, "float"), None, None, None, "float", 0, "t", False)
    want = sl.reference(x.float(), torch.tensor(0.0), wt.float(), None, None, None, "float", 0, "t", False)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert cg_ops.PATH_COUNTS[B.NAME][path] == before + 1


def _check_float_rows(dtype, m, path):
    wt, _, _ = _weights("float", 0, 96, 40, dtype)
    x = _input(m, 96, 0.6, dtype, seed=m)
    before = cg_ops.PATH_COUNTS[B.NAME][path]
    thr = torch.tensor(0.375)  # exact in bf16 / fp16: no channel flips between the op's and the fp32 reference's test
    got = B.run(x, thr, B.pack(wt, "float"), None, None, None, "float", 0, "t", False)
    want = sl.reference(x.float(), thr, wt.float(), None, None, None, "float", 0, "t", False)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert cg_ops.PATH_COUNTS[B.NAME][path] == before + 1
    assert B.kind_for(m, "float", dtype) == ("cpu-bag-gemv" if path != "dense" else "cpu-bag-gemv|dense")


@pytest.mark.parametrize("dtype,m,path", [(torch.bfloat16, 4, "bag"), (torch.bfloat16, 5, "dense"),
                                          (torch.float16, 2, "bag"), (torch.float32, 2, "dense")])
def test_without_the_c_kernel_half_float_weights_take_the_bag_up_to_four_rows(dtype, m, path, monkeypatch):
    # The dense matmul of an input-major half weight is a slow path: one bag per row wins up to 4 rows
    _no_row_kernel(monkeypatch)
    _check_float_rows(dtype, m, path)


@pytest.mark.parametrize("dtype,m,path", [(torch.bfloat16, 5, "kernel"), (torch.float16, 8, "kernel"),
                                          (torch.bfloat16, 9, "dense"), (torch.float32, 8, "kernel"),
                                          (torch.float32, 9, "dense")])
def test_float_weights_take_the_c_kernel_up_to_eight_rows(dtype, m, path):
    # 8 fp32 rows keep nearly every input between them and still take the kernel: the matmul of the input-major
    # weight is slower (FLOAT_BAG_MAX_KEPT is for one row)
    if B.row_kernel("float", dtype) is False:
        pytest.skip(f"no C kernel here: {cpu_float_gemv.unavailable()}")
    _check_float_rows(dtype, m, path)


def test_row_splits_fill_the_threads_and_cap_the_inputs_per_bag(monkeypatch):
    big = torch.empty(2048, 1024)  # 2M elements: ROW_SPLIT_MIN_WEIGHTS
    assert B.row_splits(big, 1, "float", 10, threads=4) == 4 and B.row_splits(big, 2, "int8", 10, threads=4) == 2
    assert B.row_splits(big, 8, "float", 10, threads=4) == 1  # as many rows as threads: a bag each already
    # Past BAG_INPUTS kept inputs, more bags: 1000 kept -> 32 bags of at most 32 (31.25) inputs
    assert B.row_splits(big, 1, "float", 1000, threads=2) == -(-1000 // B.BAG_INPUTS) == 32
    # Several rows (chunk-major bags): CHUNK_INPUTS per bag instead, per format
    assert B.row_splits(big, 8, "int8", B.CHUNK_INPUTS["int8"] + 1, threads=4) == 2
    assert B.row_splits(big, 8, "int8", B.CHUNK_INPUTS["int8"], threads=4) == 1
    assert B.row_splits(big, 4, "float", B.CHUNK_INPUTS["float"] + 1, threads=4) == 2
    monkeypatch.setattr(B, "CHUNK_MAJOR", False)  # row-major bags: BAG_INPUTS again
    assert B.row_splits(big, 8, "int8", B.BAG_INPUTS + 1, threads=4) == 2
    assert B.row_splits(big, 1, "int4", 1000, threads=4) == 1  # one bag per K-group already
    assert B.row_splits(big[:1000], 1, "float", 1000, threads=4) == 1  # a cache-resident weight: one bag
    assert "supported" in B.unavailable("fp8")


# -- lowering: which linears take the bag GEMV, and when they must not -----------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64)


def _bag_kernels(fast):
    return [k for k in ec.explain(fast).kernels if k.name == B.NAME]


@pytest.mark.parametrize("weights,group", [("int8", None)])  # fp32 int4: torch's packed op on bf16 x (test_cpu_packed)
def test_quantized_decode_lowers_to_bag_on_cpu(llama, weights, group):
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    cfg = ec.Quantize(weights=weights, group_size=group)
    path = "kernel" if B.row_kernel(weights, torch.uint8) else "bag"  # int8: the C kernel on the byte rows
    before = cg_ops.PATH_COUNTS[B.NAME][path]
    fast = ec.effcompile(llama, passes=[cfg], cache=False)
    ref = ec.effcompile(llama, passes=[cfg], cache=False, use_triton=True)  # the dequant kernel, interpreted
    with torch.no_grad():
        out = fast(ids).logits
    kernels = _bag_kernels(fast)  # 2 layers x (q/k/v, o, gate/up, down): FuseParallelLinears is default
    assert len(kernels) == 8 and {k.kind for k in kernels} == {"cpu-bag-gemv"}
    assert {k.ops for k in kernels} == {("wq_linear", weights + (f"g{group}" if group else ""))}
    assert cg_ops.PATH_COUNTS[B.NAME][path] == before + 8
    assert not [k for k in ec.explain(fast).kernels if k.name == D.NAME]
    with torch.no_grad():
        torch.testing.assert_close(out, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert not _bag_kernels(ref)  # forced Triton keeps the original layout and kernel


def test_w8a8_is_not_lowered_to_bag(llama):
    fast = ec.effcompile(llama, passes=[ec.Quantize(weights="int8", activations="int8")], cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 128, (1, 1)))
    assert not _bag_kernels(fast)
    assert {k.name for k in ec.explain(fast).kernels if k.ops and k.ops[0] == "wq_linear"} == {D.NAME}


@pytest.mark.interpreter
def test_interpreter_keeps_the_triton_layout(llama, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fast = ec.effcompile(llama, passes=[ec.Quantize(weights="int8")], cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 128, (1, 1)))
    assert not _bag_kernels(fast)


@pytest.mark.parametrize("m", [1, 17])  # bag and dense paths
def test_fp16_large_activations_do_not_overflow_the_unscaled_sums(m):
    # int8 codes are summed before the per-channel scale: 127 * sum|x| is far past fp16's 65504 here,
    # while the scaled result is not.
    wt, s, _ = _weights("int8", 0, 512, 24)
    x = (_input(m, 512, 0.0, torch.float32) * 60).half()
    got = B.run(x, None, B.pack(wt, "int8"), s, None, None, "int8", 0, "", False)
    want = qops.reference(x.float(), wt.t(), s, None, None, "int8", 0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("kernel", ["built", "missing", "size limit"])
def test_small_float_weights_take_the_kernel_else_sgemv(kernel, monkeypatch):
    # Under FLOAT_BAG_MIN_WEIGHTS the float bag never runs: the C kernel takes the call (any size since session 26:
    # KERNEL_MIN_WEIGHTS 0), or without it (no compiler, or a weight under KERNEL_MIN_WEIGHTS) the dense matmul.
    monkeypatch.setattr(B, "FLOAT_BAG_MIN_WEIGHTS", 1 << 21)
    if kernel == "missing":
        _no_row_kernel(monkeypatch)
    if kernel == "size limit":
        monkeypatch.setattr(B, "KERNEL_MIN_WEIGHTS", 1 << 21)
    if kernel == "built" and cpu_float_gemv.unavailable() is not None:
        pytest.skip(cpu_float_gemv.unavailable())
    wt, _, _ = _weights("float", 0, 64, 32)
    x = _input(1, 64, 0.5, torch.float32)
    path = "kernel" if kernel == "built" else "dense"
    before = dict(cg_ops.PATH_COUNTS[B.NAME])
    got = B.run(x, torch.tensor(0.3), B.pack(wt, "float"), None, None, None, "float", 0, "", False)
    assert cg_ops.PATH_COUNTS[B.NAME][path] == before.get(path, 0) + 1
    assert sum(cg_ops.PATH_COUNTS[B.NAME].values()) == sum(before.values()) + 1
    torch.testing.assert_close(got, sl.reference(x, torch.tensor(0.3), wt, None, None, None, "float", 0, "", False),
                               rtol=1e-5, atol=1e-5)


def test_an_unlimited_float_kept_share_runs_the_row_skipping_path(monkeypatch):
    # sparse_cpu.py --raw-bags lifts the limit with inf: every one-row fp32 call keeps the row-skipping path
    monkeypatch.setattr(B, "FLOAT_BAG_MAX_KEPT", float("inf"))
    wt, _, _ = _weights("float", 0, 200, 48)
    x = _input(1, 200, 0.0, torch.float32, seed=4)
    path = _path("float", 1, B.pack(wt, "float"), 0.0)
    before = cg_ops.PATH_COUNTS[B.NAME][path]
    got = B.run(x, torch.tensor(0.0), B.pack(wt, "float"), None, None, None, "float", 0, "t", False)
    torch.testing.assert_close(got, sl.reference(x, torch.tensor(0.0), wt, None, None, None, "float", 0, "t", False),
                               rtol=1e-5, atol=1e-5)
    assert path != "dense" and cg_ops.PATH_COUNTS[B.NAME][path] == before + 1


@pytest.mark.parametrize("fmt,dtype", [("float", torch.bfloat16), ("int8", torch.float32)])
@pytest.mark.parametrize("m", [2, 4])
def test_chunk_major_and_row_major_bags_agree(fmt, dtype, m, monkeypatch):
    # Several rows: bags by input range then row (a range's weight rows read once for all rows), cut into ranges
    # that do not divide K; row-major as before. Both take the bag and equal the reference.
    _no_row_kernel(monkeypatch)  # float rows would take the C kernel
    monkeypatch.setattr(B, "ROW_SPLIT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(B, "CHUNK_INPUTS", {"float": 7, "int8": 7})  # ~15 ranges of 7 columns for K = 100
    wt, s, z = _weights(fmt, 0, 100, 40, dtype)
    rows = B.pack(wt, fmt)
    x = _input(m, 100, 0.3, dtype, seed=m)
    want = sl.reference(x.float(), torch.tensor(0.2), wt.float() if fmt == "float" else wt, s, z, None, fmt, 0, "t",
                        False)
    for chunk_major in (True, False):
        monkeypatch.setattr(B, "CHUNK_MAJOR", chunk_major)
        assert B.row_splits(rows, m, fmt, 70) > 1
        before = cg_ops.PATH_COUNTS[B.NAME]["bag"]
        got = B.run(x, torch.tensor(0.2), rows, s, z, None, fmt, 0, "t", False)
        assert cg_ops.PATH_COUNTS[B.NAME]["bag"] == before + 1
        tol = 1e-5 if dtype == torch.float32 else 6e-2  # bf16: each of ~15 partial sums is rounded to bf16
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
