"""CPU int4 sparse GEMV (C kernel) vs sparse_linear's reference: odd shapes, thresholds, dtypes, 1-8 rows, prefill;
its build (cache, a broken library, a wrong kernel, no compiler) and where the lowering uses it."""

from __future__ import annotations

import copy

import pytest
import torch

import effcompile as ec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import cpu_int4_gemv as M
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl
from effcompile.compiler import sparse_ops
from effcompile.testing import tiny_hf


def _weights(k, n, group, dtype=torch.float32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k * n)) / k**0.5
    qw = qops.quantize_weight(w.to(dtype), "int4", group)
    return sl.to_input_major(qw.qweight, qw.scales, qw.zeros, "int4", group)


def _input(m, k, zero_frac, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[torch.rand(m, k, generator=g) < zero_frac] = 0
    return x.to(dtype)


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if M.unavailable():
        pytest.skip(M.unavailable())


@pytest.mark.parametrize("k,n,group", [(64, 10, 32), (96, 300, 32), (256, 514, 128), (128, 512, 64)])
def test_pack_round_trip(k, n, group):
    wt, s, z = _weights(k, n, group)
    panels, sz = M.pack(wt, s, z)
    assert panels.shape == (-(-n // 256), k, 128) and sz.shape == (panels.shape[0], k // group, 2, 256)
    codes, s2, z2 = M.unpack(panels, sz, n)
    assert torch.equal(codes, torch.stack((wt & 0xF, wt >> 4), -1).view(k, n))
    assert torch.equal(s2, s.float()) and torch.equal(z2, z.float())


@pytest.mark.parametrize("k,n,group", [(64, 10, 32), (96, 300, 32), (256, 514, 128)])
@pytest.mark.parametrize("m", [1, 3, 8, 13])
@pytest.mark.parametrize("zero_frac", [0.0, 0.6, 1.0])  # no zeros, sparse, all zeros
@pytest.mark.parametrize("threshold", ["none", "tensor", "channels"])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_reference(k, n, group, m, zero_frac, threshold, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    wt, s, z = _weights(k, n, group)
    panels, sz = M.pack(wt, s, z)
    x = _input(m, k, zero_frac, seed=m)
    bias = torch.randn(n)
    thr = {"none": None, "tensor": torch.tensor(0.4), "channels": torch.rand(k)}[threshold]
    before = dict(cg_ops.PATH_COUNTS[M.NAME])
    got = M.run(x, thr, panels, sz, bias, n, group, "t", False)
    want = sl.reference(x, torch.tensor(0.0) if thr is None else thr, wt, s, z, bias, "int4", group, "t", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert cg_ops.PATH_COUNTS[M.NAME]["kernel"] == before.get("kernel", 0) + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 13])
def test_half_dtypes(dtype, m):
    wt, s, z = _weights(128, 300, 32, dtype)
    panels, sz = M.pack(wt, s, z)
    assert sz.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)  # bf16 scales stay bf16
    x = _input(m, 128, 0.3, dtype)
    thr = torch.tensor(0.37)  # not a bf16 value: the kernel must compare against the threshold rounded like x
    got = M.run(x, thr, panels, sz, None, 300, 32, "t", False)
    want = sl.reference(x, thr, wt, s, z, None, "int4", 32, "t", False)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    keep = x.abs() > thr.to(dtype)
    got_mask = M.run(torch.where(keep, x, 0), None, panels, sz, None, 300, 32, "t", False)
    torch.testing.assert_close(got, got_mask, rtol=0, atol=0)  # the same inputs kept, bit for bit


def test_decode_only_prefill_is_unthresholded():
    wt, s, z = _weights(64, 40, 32)
    panels, sz = M.pack(wt, s, z)
    x = _input(1, 64, 0.0).expand(5, 64).contiguous().view(1, 5, 64)  # prefill-shaped
    got = M.run(x, torch.tensor(10.0), panels, sz, None, 40, 32, "t", True)  # would zero everything
    torch.testing.assert_close(got, x @ sl.rows_of(wt, s, z, "int4", 32, torch.float32), rtol=1e-5, atol=1e-5)


def test_achieved_sparsity_is_counted():
    wt, s, z = _weights(64, 40, 32)
    panels, sz = M.pack(wt, s, z)
    x = _input(2, 64, 0.0)
    thr = torch.tensor(float(x.abs().median()))
    with sparse_ops.measure_sparsity() as got:
        M.run(x, thr, panels, sz, None, 40, 32, "lin", False)
    assert got["lin"] == pytest.approx(float((x.abs() <= thr).float().mean()))


# -- the build: cached, checked, rebuilt, refused -------------------------------------------------


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not loaded the kernel yet, with its own cache directory."""
    for attr, value in (("decided", False), ("fn", None), ("why", None)):  # restored after the test
        monkeypatch.setattr(M.KERNEL, attr, value)
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "native"


def test_library_is_cached_and_a_broken_one_is_rebuilt(fresh, monkeypatch, tmp_path):
    assert M.unavailable() is None
    (lib,) = fresh.glob("*.so")
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
    built = lib.stat().st_mtime_ns
    M.KERNEL.decided = False  # the fixture restores it
    assert M.unavailable() is None and lib.stat().st_mtime_ns == built  # a second process loads the cached one
    # A broken library under the same name in another cache directory (one this process has not loaded: a loaded
    # library's path is dlopen's cache key) fails to load, so it is built again.
    other = tmp_path / "other"
    (other / "native").mkdir(parents=True, mode=0o700)
    (other / "native" / lib.name).write_bytes(b"not a shared library")
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(other))
    M.KERNEL.decided = False
    assert M.unavailable() is None
    assert (other / "native" / lib.name).read_bytes()[:4] == b"\x7fELF"


def test_a_kernel_that_disagrees_with_the_reference_is_refused(fresh, monkeypatch, tmp_path):
    wrong = tmp_path / "wrong.c"
    wrong.write_text(M.SOURCE.read_text().replace("_mm512_set1_ps(16.f)", "_mm512_set1_ps(15.f)")
                     .replace("& 15u", "& 7u"))  # both the AVX-512 and the plain-C variant go wrong
    monkeypatch.setattr(M.KERNEL, "source", wrong)
    assert "disagrees with the reference" in M.unavailable()


def test_no_compiler_is_a_reason_and_run_still_answers(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    why = M.unavailable()
    assert why and "cc" in why
    wt, s, z = _weights(64, 40, 32)
    panels, sz = M.pack(wt, s, z)
    x = _input(1, 64, 0.5)
    before = cg_ops.PATH_COUNTS[M.NAME]["dense"]
    got = M.run(x, torch.tensor(0.3), panels, sz, None, 40, 32, "t", False)
    torch.testing.assert_close(got, sl.reference(x, torch.tensor(0.3), wt, s, z, None, "int4", 32, "t", False),
                               rtol=1e-5, atol=1e-5)
    assert cg_ops.PATH_COUNTS[M.NAME]["dense"] == before + 1


# -- lowering -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64)


def _compile(model, **kw):
    calib = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    passes = [ec.ThresholdChannels(sparsity=0.5), ec.Quantize(weights="int4", group_size=32)]
    fast = ec.effcompile(model, passes=passes, calibration=calib, cache=False, **kw)
    with torch.no_grad():
        fast(**calib[0])
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thresholded_int4_decode_lowers_to_the_kernel(llama, dtype):
    model = copy.deepcopy(llama).to(dtype)
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(5))
    fast = _compile(model)
    before = cg_ops.PATH_COUNTS[M.NAME]["kernel"]
    with torch.no_grad(), sparse_ops.measure_sparsity() as got:
        out = fast(ids).logits
    kernels = [k for k in ec.explain(fast).kernels if k.name == M.NAME]
    # the decode graph: 2 layers x (q/k/v, o, gate/up, down); prefill too (decode_only: thresholds not applied)
    assert {k.kind for k in kernels} >= {"cpu-int4-gemv"} and {k.ops for k in kernels} == {("sparse_linear", "int4g32")}
    assert cg_ops.PATH_COUNTS[M.NAME]["kernel"] == before + 8
    assert not [k for k in ec.explain(fast).kernels if k.ops[:1] == ("wq_linear",)]
    assert len(got) == 14 and all(0 < v < 1 for v in got.values())  # counted per linear, thresholds applied
    ref = _compile(model, use_triton=True)  # the same thresholds through the interpreted sparse kernel
    with torch.no_grad():
        want = ref(ids).logits
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_takes_the_kernel_at_one_and_eight_rows_and_bf16_the_packed_matmul_at_two(llama, dtype):
    if qops.packed_cpu_unavailable("int4", dtype, 64):
        pytest.skip(qops.packed_cpu_unavailable("int4", dtype, 64))
    model = copy.deepcopy(llama).to(dtype)
    cfg = [ec.Quantize(weights="int4", group_size=32, targets=("attn", "ffn", "head"))]
    gen = torch.Generator().manual_seed(3)
    one, two = torch.randint(0, 128, (1, 1), generator=gen), torch.randint(0, 128, (2, 1), generator=gen)
    eight = torch.randint(0, 128, (8, 1), generator=gen)
    fast = ec.effcompile(model, passes=cfg, cache=False)
    ref = ec.effcompile(model, passes=cfg, cache=False, use_triton=True)  # the dequant kernel, interpreted
    with torch.no_grad():
        out, want = fast(one).logits, ref(one).logits
    kinds = [k.kind for k in ec.explain(fast).kernels if k.ops[:1] == ("wq_linear",)]
    assert kinds == ["cpu-int4-gemv"] * 9  # 2 layers x (q/k/v, o, gate/up, down) and the head
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # fp32: x is not rounded to bf16 as the packed matmul needs
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    torch._dynamo.reset()  # a static 2-row graph (dynamo would otherwise recompile the batch dimension dynamic)
    wide = ec.effcompile(model, passes=cfg, cache=False)
    with torch.no_grad():
        wide(two)
    kinds = {k.kind for k in ec.explain(wide).kernels if k.ops[:1] == ("wq_linear",)}
    # bf16 at 2 rows: the packed matmul (faster there); fp32 x every row count: the kernel (no rounding to bf16)
    assert kinds == {"cpu-int4-gemv" if dtype == torch.float32 else "cpu-int4pack-mm"}
    torch._dynamo.reset()
    batch = ec.effcompile(model, passes=cfg, cache=False)
    with torch.no_grad():
        out, want = batch(eight).logits, ref(eight).logits
    assert {k.kind for k in ec.explain(batch).kernels if k.ops[:1] == ("wq_linear",)} == {"cpu-int4-gemv"}
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)


def test_the_plain_c_variant_agrees_too(fresh, monkeypatch):
    # Built for a CPU without AVX-512 (x86-64-v2): the plain loops pass the same self-check (1, 2 and 7 rows).
    from effcompile.codegen import native

    monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64-v2" if f == "-march=native" else f for f in native.FLAGS))
    assert M.unavailable() is None


def test_a_cached_int4_kernel_graph_is_rebuilt_where_the_kernel_is_missing(llama, tmp_path, monkeypatch):
    # An entry lowered to the kernel holds only its panel layout; loaded where the kernel cannot build, its fallback
    # would dequantize every weight per call. The entry is rebuilt instead (packed int4 matmul), and says so.
    cfg = [ec.Quantize(weights="int4", group_size=32, targets=("attn", "ffn", "head"))]
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ec.effcompile(llama, passes=cfg, cache=True, cache_dir=tmp_path)(ids).logits
    torch._dynamo.reset()
    for attr, value in (("decided", True), ("fn", None), ("why", "CPU int4 GEMV kernel unavailable: test")):
        monkeypatch.setattr(M.KERNEL, attr, value)
    fast = ec.effcompile(llama, passes=cfg, cache=True, cache_dir=tmp_path)
    with torch.no_grad():
        got = fast(ids).logits
    (g,) = ec.explain(fast).graphs
    assert "laid out for the CPU int4 C kernel, unavailable here" in g.cache_note, (g.cache, g.cache_note)
    kinds = {k.kind for k in ec.explain(fast).kernels}
    assert "cpu-int4-gemv" not in kinds and any(k.startswith("cpu-int4pack-mm") for k in kinds), kinds
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)  # the packed matmul rounds x to bf16
