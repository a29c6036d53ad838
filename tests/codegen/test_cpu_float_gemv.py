"""CPU one-row fp32 GEMV (C kernel) vs torch: odd shapes, threshold forms, all-zero and no-zero inputs, the kept-share
cut-off; a wrong kernel is refused."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen.kernels import cpu_float_gemv as F


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if F.unavailable():
        pytest.skip(F.unavailable())


@pytest.mark.parametrize("k,n", [(1, 1), (33, 17), (300, 1030), (64, 4096)])  # 4096: several slabs per thread
@pytest.mark.parametrize("zero_frac", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("threshold", ["none", "tensor", "channels"])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_torch(k, n, zero_frac, threshold, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(k * n)
    rows = torch.randn(k, n, generator=gen)
    x = torch.randn(k, generator=gen)
    x[torch.rand(k, generator=gen) < zero_frac] = 0
    thr = {"none": None, "tensor": torch.tensor(0.4), "channels": torch.rand(k, generator=gen)}[threshold]
    keep = x != 0 if thr is None else x.abs() > thr
    got = F.call(x, thr, rows, k)
    torch.testing.assert_close(got, torch.where(keep, x, 0) @ rows, rtol=1e-5, atol=1e-5)
    if int(keep.sum()):
        assert F.call(x, thr, rows, int(keep.sum()) - 1) is None  # over the limit: nothing computed


def test_a_kernel_that_disagrees_with_the_reference_is_refused(monkeypatch, tmp_path):
    for attr, value in (("decided", False), ("fn", None), ("why", None)):  # restored after the test
        monkeypatch.setattr(F.KERNEL, attr, value)
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    wrong = tmp_path / "wrong.c"
    wrong.write_text(F.SOURCE.read_text().replace("acc[j] += xk * row[j]", "acc[j] += xk * row[j] * 1.001f"))
    monkeypatch.setattr(F.KERNEL, "source", wrong)
    assert "disagrees with the reference" in F.unavailable()


def test_the_plain_c_variant_agrees_too(monkeypatch, tmp_path):
    from effcompile.codegen import native

    for attr, value in (("decided", False), ("fn", None), ("why", None)):  # restored after the test
        monkeypatch.setattr(F.KERNEL, attr, value)
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64-v2" if f == "-march=native" else f for f in native.FLAGS))
    assert F.unavailable() is None
