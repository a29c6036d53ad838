"""CPU float GEMV (C kernel) vs torch: 1-8 rows, fp32 / bf16 / fp16 weights, odd shapes, threshold forms, all-zero
and no-zero inputs, the kept-input cut-off; a wrong kernel is refused, the plain-C variant agrees too."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen.kernels import cpu_float_gemv as F


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if F.unavailable():
        pytest.skip(F.unavailable())


def _case(m, k, n, zero_frac, threshold, dtype=torch.float32):
    gen = torch.Generator().manual_seed(k * n + m)
    rows = torch.randn(k, n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen)
    x[torch.rand(m, k, generator=gen) < zero_frac] = 0
    thr = {"none": None, "tensor": torch.tensor(0.4), "channels": torch.rand(k, generator=gen)}[threshold]
    keep = x != 0 if thr is None else x.abs() > thr
    return rows, x, thr, keep


@pytest.mark.parametrize("k,n", [(1, 1), (33, 17), (300, 1030), (64, 4096)])  # 4096: several slabs per thread
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("zero_frac", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("threshold", ["none", "tensor", "channels"])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_torch(k, n, m, zero_frac, threshold, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rows, x, thr, keep = _case(m, k, n, zero_frac, threshold)
    got = F.call(x, thr, rows, k)
    torch.testing.assert_close(got, torch.where(keep, x, 0) @ rows, rtol=1e-5, atol=1e-5)
    union = int(keep.any(0).sum())  # the inputs some row keeps: each weight row read once for all rows
    if union:
        assert F.call(x, thr, rows, union - 1) is None  # over the limit: nothing computed
        assert F.call(x, thr, rows, union) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("k,n", [(37, 23), (200, 1100)])
def test_half_weights_accumulate_in_fp32(dtype, m, k, n):
    # Each weight converts exactly to fp32 and the sums stay fp32 (FBGEMM's half bag rounds its output to the
    # weight dtype): the reference is the fp32 product of the same half weights.
    rows, x, thr, _ = _case(m, k, n, 0.3, "tensor", dtype)
    x = x.to(dtype)
    keep = x.abs() > thr.to(dtype)  # the kernel compares in x's dtype, as the reference op does
    got = F.call(x, thr, rows, k)
    want = torch.where(keep, x, 0).float() @ rows.float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp16_subnormal_and_extreme_weights_convert_like_torch():
    special = torch.tensor([6e-8, -3e-6, 65504.0, -65504.0, 6.1e-5, -0.0, 1.0], dtype=torch.float16)
    rows = special.repeat(3, 1)
    x = torch.tensor([[0.0, 2.0, 0.0]])  # one kept input: y is 2 * its row, exactly
    torch.testing.assert_close(F.call(x, None, rows, 3), 2 * special.float().view(1, -1), rtol=0, atol=0)


def test_rows_out_of_range_are_refused():
    with pytest.raises(ValueError, match="1-8 rows"):
        F.call(torch.randn(9, 16), None, torch.randn(16, 4), 16)


def test_a_kernel_that_disagrees_with_the_reference_is_refused(monkeypatch, tmp_path):
    for attr, value in (("decided", False), ("fn", None), ("why", None)):  # restored after the test
        monkeypatch.setattr(F.KERNEL, attr, value)
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    wrong = tmp_path / "wrong.c"
    source = F.SOURCE.read_text()
    assert source.count("v[kept * M + r] = keep ? xk : 0.f;") == 1
    wrong.write_text(source.replace("v[kept * M + r] = keep ? xk : 0.f;", "v[kept * M + r] = keep ? xk * 1.001f : 0.f;"))
    monkeypatch.setattr(F.KERNEL, "source", wrong)
    assert "disagrees with the reference" in F.unavailable()


def test_the_plain_c_variant_agrees_too(monkeypatch, tmp_path):
    from effcompile.codegen import native

    for attr, value in (("decided", False), ("fn", None), ("why", None)):  # restored after the test
        monkeypatch.setattr(F.KERNEL, attr, value)
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64-v2" if f == "-march=native" else f for f in native.FLAGS))
    assert F.unavailable() is None
    rows, x, thr, keep = _case(5, 70, 300, 0.5, "channels", torch.float16)
    torch.testing.assert_close(F.call(x, thr, rows, 70), torch.where(keep, x, 0) @ rows.float(), rtol=1e-5, atol=1e-5)
