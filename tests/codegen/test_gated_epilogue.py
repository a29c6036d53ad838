"""The linear kernels' silu(gate) * up epilogue (EPILOGUE 1) vs the unfused computation, under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from effcompile.codegen import aot
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.codegen.kernels import sparse_gemv as S
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl

pytestmark = pytest.mark.interpreter

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The kernel rounds the linear's output, silu's and the product to the activation dtype, as the unfused graph
# does: one rounding step apart at most (the sigmoid's exp is triton's, not torch's). bf16 takes two: under the
# interpreter a float -> bf16 conversion truncates (numpy has no bf16; on a GPU it rounds to nearest).
STEP = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -6}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rel(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _epilogue_of(launch_fn) -> tuple[torch.Tensor, int]:
    """The gated result of one launch and its EPILOGUE constexpr (1: in the kernel's store)."""
    with aot.record_launches() as seen:
        launch_fn()
    out = launch_fn()
    return out, seen[0].kwargs["EPILOGUE"]


@pytest.mark.parametrize("fmt,group,config,m", [
    ("int4", 128, None, 1),                                        # the built-in tiles, split-K
    ("int4", 32, plan.Config(64, 64, 4, 2, 3, fma=True), 1),       # one-row words, 2 groups a chunk, prefetch
    ("int4", 32, plan.Config(32, 64, 4, 1, 1, fma=True), 3),       # several-row fma, no split
    ("int8", 0, plan.Config(32, 128, 4, 2, 3), 8),                 # dot tiles, split-K
    ("mxint8", 32, None, 2),
    ("int4", 64, None, 19),                                        # prefill tiles
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequant_epilogue_matches_the_unfused_gate(fmt, group, config, m, dtype):
    # N = 94: 47 gate/up pairs, so the last tile of every config is partial.
    gen = torch.Generator().manual_seed(m)
    qw = qops.quantize_weight((torch.randn(94, 640, generator=gen) / 20).to(dtype), fmt, group)
    x, b = torch.randn(m, 640, generator=gen).to(dtype), torch.randn(94, generator=gen).to(dtype)
    got, in_kernel = _epilogue_of(lambda: D.launch(x, *qw[:3], b, fmt, group, config=config, epilogue="silu_mul"))
    plain = D.launch(x, *qw[:3], b, fmt, group, config=config)
    assert in_kernel == 1 and got.shape == (m, 47) and got.dtype == dtype
    torch.testing.assert_close(got, qops.apply_epilogue(plain, "silu_mul"), rtol=STEP[dtype], atol=1e-6)
    # Against the eager definition: the GEMV's own difference, through a product of two rounded values.
    assert _rel(got, qops.apply_epilogue(D.reference(x, *qw[:3], b, fmt, group), "silu_mul")) <= 2 * TOL[dtype]


def test_dequant_epilogue_runs_after_kernels_that_cannot_take_it():
    # W8A8's int8 x int8 kernel, and a split-K launch with an EoRA term (its sums finish in an fp32 output):
    # the full output, then the epilogue's torch ops.
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=gen) / 20).to(torch.bfloat16)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
    q8 = qops.quantize_weight(w, "int8", 0)
    got = D.launch(x, *q8[:3], None, "int8", 0, act="int8", epilogue="silu_mul")
    assert torch.equal(got, qops.apply_epilogue(D.launch(x, *q8[:3], None, "int8", 0, act="int8"), "silu_mul"))
    q4 = qops.quantize_weight(w, "int4", 32)
    lora = torch.randn(4, 256, generator=gen).to(torch.bfloat16) / 10, torch.randn(64, 4, generator=gen).to(torch.bfloat16) / 10
    got, in_kernel = _epilogue_of(lambda: D.launch(x, *q4[:3], None, "int4", 32, split_k=2, lora_a=lora[0],
                                                   lora_b=lora[1], epilogue="silu_mul"))
    full = D.launch(x, *q4[:3], None, "int4", 32, split_k=2, lora_a=lora[0], lora_b=lora[1])
    assert in_kernel == 0 and torch.equal(got, qops.apply_epilogue(full, "silu_mul"))


def test_bad_epilogues_are_refused():
    qw = qops.quantize_weight(torch.randn(63, 64) / 20, "int8", 0)
    with pytest.raises(ValueError, match="even N"):
        D.launch(torch.randn(1, 64), *qw[:3], None, "int8", 0, epilogue="silu_mul")
    with pytest.raises(ValueError, match="epilogue='gelu'"):
        qops.apply_epilogue(torch.randn(2, 4), "gelu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
@pytest.mark.parametrize("m,config", [(1, None), (1, plan.Config(256, 16, 4, 2, 2, True, True)),
                                      (1, plan.Config(256, 16, 4, 3, 2, True, True, flat=True)), (3, None),
                                      (8, plan.Config(64, 64, 4, 3, 3))])
def test_sparse_epilogue_matches_the_unfused_gate(fmt, m, config, dtype):
    gen = torch.Generator().manual_seed(m)
    w = (torch.randn(94, 512, generator=gen) / 20).to(dtype)
    group = 64 if fmt == "int4" else 0
    q = qops.quantize_weight(w, fmt, group) if fmt != "float" else None
    wt, s, z = sl.to_input_major(w if q is None else q.qweight, *((None, None) if q is None else (q.scales, q.zeros)),
                                 fmt, group)
    x, b, t = torch.randn(m, 512, generator=gen).to(dtype), torch.randn(94, generator=gen).to(dtype), torch.tensor(0.6)
    got, in_kernel = _epilogue_of(lambda: S.launch(x, t, wt, s, z, b, fmt, group, config=config, epilogue="silu_mul"))
    plain = S.launch(x, t, wt, s, z, b, fmt, group, config=config)
    assert in_kernel == 1 and got.shape == (m, 47)
    # The same GEMV either way (against its eager definition: test_sparse_kernels.py).
    torch.testing.assert_close(got, qops.apply_epilogue(plain, "silu_mul"), rtol=STEP[dtype], atol=1e-6)
