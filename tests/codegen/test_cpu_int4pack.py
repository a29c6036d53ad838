"""torch's packed int4 CPU matmul for bf16 / fp16 activations: the op vs its reference, and which linears lower to it."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import cpu_bag_gemv as B
from effcompile.codegen.kernels import cpu_int4pack as P
from effcompile.compiler import ops as qops
from effcompile.testing import tiny_hf

pytestmark = pytest.mark.skipif(P.unavailable(torch.bfloat16, 16, 32) is not None, reason="no CPU int4 matmul")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k,group", [(96, 288, 32), (128, 256, 64), (48, 384, 128)])
@pytest.mark.parametrize("m", [1, 8, 40])
def test_op_equals_the_dequantized_linear(n, k, group, m, dtype):
    gen = torch.Generator().manual_seed(m + n)
    qw = qops.quantize_weight(torch.randn(n, k, generator=gen) / 20, "int4", group)
    x, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    packed, sz = P.pack(*qw[:3], dtype)
    got = P.op(x, packed, sz, b, group)
    want = P.reference(x, *qw[:3], b, group)
    assert got.dtype == dtype and got.shape == (m, n)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 1e-2, err  # 16-bit outputs and torch's own summation order


def test_what_it_refuses():
    assert "fp16 only" in P.unavailable(torch.float32, 96, 32)
    assert "multiple of 16" in P.unavailable(torch.bfloat16, 94, 32)
    assert "group_size=16" in P.unavailable(torch.bfloat16, 96, 16)


def _kernels(fast, name):
    return [k for k in ec.explain(fast).kernels if k.name == name]


def test_bf16_int4_linears_lower_to_it_and_fp32_ones_keep_the_bag():
    llama = tiny_hf("llama", layers=2, hidden=64)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    cfg = ec.Quantize(weights="int4", group_size=32)
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    before = cg_ops.PATH_COUNTS[P.NAME]["cpu"]
    fast = ec.effcompile(bf16, passes=[cfg], cache=False)
    ref = ec.effcompile(bf16, passes=[cfg], cache=False, use_triton=True)  # the dequant kernel, interpreted
    with torch.no_grad():
        out, want = fast(ids).logits, ref(ids).logits
    kernels = _kernels(fast, P.NAME)  # 2 layers x (q/k/v, o, gate/up, down): FuseParallelLinears is default
    assert len(kernels) == 8 and {k.kind for k in kernels} == {"cpu-int4pack-mm"} and not _kernels(fast, B.NAME)
    assert cg_ops.PATH_COUNTS[P.NAME]["cpu"] == before + 8
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, err
    fp32 = ec.effcompile(llama, passes=[cfg], cache=False)
    with torch.no_grad():
        fp32(ids)
    assert not _kernels(fp32, P.NAME) and len(_kernels(fp32, B.NAME)) == 8  # the bag GEMV by design: no fallback


def test_a_bf16_linear_it_cannot_take_is_listed_with_the_reason():
    odd = tiny_hf("llama", layers=1, hidden=64, vocab=120).to(torch.bfloat16)  # the LM head: 120 outputs
    fast = ec.effcompile(odd, passes=[ec.Quantize(weights="int4", group_size=32, targets=("attn", "ffn", "head"))],
                         cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 120, (1, 3)))
    assert len(_kernels(fast, P.NAME)) == 4  # the layer's four (fused) linears
    reasons = [why for g in ec.explain(fast).graphs for _, why in g.fallbacks if "int4 matmul" in why]
    assert reasons and all("not a multiple of 16" in why for why in reasons)
    assert _kernels(fast, B.NAME)  # those keep the bag GEMV
