"""CPU weight-only int4 / int8 with 16-bit activations: wq_linear stays for its eager path, torch's packed matmuls."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.codegen.kernels import cpu_bag_gemv as B
from effcompile.compiler import ops as qops
from effcompile.testing import tiny_hf


def _packed_kernels(fast):
    return [k for k in ec.explain(fast).kernels if k.kind in ("cpu-int4pack-mm", "cpu-int8pack-mm")]


@pytest.mark.parametrize("weights,group", [("int4", 32), ("int8", None)])
def test_bf16_linears_keep_torchs_packed_matmul_and_fp32_ones_take_the_bag(weights, group):
    cfg = ec.Quantize(weights=weights, group_size=group)
    if qops.packed_cpu_unavailable(weights, torch.bfloat16, 64):
        pytest.skip(qops.packed_cpu_unavailable(weights, torch.bfloat16, 64))
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    before = qops.PATH_COUNTS["wq_linear"][f"{weights}pack"]
    fast = ec.effcompile(bf16, passes=[cfg], cache=False)
    ref = ec.effcompile(bf16, passes=[cfg], cache=False, use_triton=True)  # the dequant kernel, interpreted
    with torch.no_grad():
        out, want = fast(ids).logits, ref(ids).logits
    kernels = _packed_kernels(fast)  # 2 layers x (q/k/v, o, gate/up, down): FuseParallelLinears is default
    assert len(kernels) == 8 and {k.kind for k in kernels} == {f"cpu-{weights}pack-mm"}
    assert len([k for k in ec.explain(fast).kernels if k.ops[:1] == ("wq_linear",)]) == 8  # listed once each
    assert not [k for k in ec.explain(fast).kernels if k.name == B.NAME]
    assert qops.PATH_COUNTS["wq_linear"][f"{weights}pack"] == before + 8  # 5 rows: the packed op ran
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, err
    fp32 = ec.effcompile(tiny_hf("llama", layers=2, hidden=64), passes=[cfg], cache=False)
    with torch.no_grad():
        fp32(ids)
    assert not _packed_kernels(fp32) and len([k for k in ec.explain(fp32).kernels if k.name == B.NAME]) == 8


def test_int4_rows_over_eight_stay_packed_only_for_16_bit_activations():
    # int4 with bf16 / fp16 x takes torch's packed matmul at any row count (faster than dequantizing);
    # fp32 x and int8 keep it for decode-shaped calls (PACKED_MAX_ROWS), int8 with 16-bit x then a plain matmul.
    gen = torch.Generator().manual_seed(0)
    qw = qops.quantize_weight(torch.randn(48, 96, generator=gen) / 10, "int4", 32)
    rows = qops.PACKED_MAX_ROWS + 4
    for dtype, packed in ((torch.bfloat16, True), (torch.float32, False)):
        got = qops._fast_cpu(torch.randn(rows, 96, generator=gen).to(dtype), *qw[:3], "int4", 32)
        assert (got is not None) == packed, dtype
    qw8 = qops.quantize_weight(torch.randn(48, 96, generator=gen) / 10, "int8", 0)
    x8 = torch.randn(rows, 96, generator=gen).bfloat16()
    got, path = qops._fast_cpu(x8, *qw8[:3], "int8", 0)  # prefill rows: codes in bf16, one matmul, then scales
    want = qops.reference(x8, *qw8[:3], None, "int8", 0)
    assert path == "int8-dense" and ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    assert qops._fast_cpu(x8.float(), *qw8[:3], "int8", 0) is None  # fp32: the reference dequantization


def test_an_int4_weight_it_cannot_take_keeps_the_bag():
    assert "multiple of 16" in qops.packed_cpu_unavailable("int4", torch.bfloat16, 120)
    assert "lose to the bag" in qops.packed_cpu_unavailable("int4", torch.float32, 128)
    odd = tiny_hf("llama", layers=1, hidden=64, vocab=120).to(torch.bfloat16)  # the LM head: 120 outputs
    fast = ec.effcompile(odd, passes=[ec.Quantize(weights="int4", group_size=32, targets=("attn", "ffn", "head"))],
                         cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 120, (1, 3)))
    assert len(_packed_kernels(fast)) == 4  # the layer's four (fused) linears
    assert len([k for k in ec.explain(fast).kernels if k.name == B.NAME]) == 1  # the head
