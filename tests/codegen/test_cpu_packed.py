"""CPU weight-only int4 / int8 with 16-bit activations (and int4 with fp32 ones, rounded to bf16): wq_linear stays for
its eager path, torch's packed matmuls."""

from __future__ import annotations

import pytest
import torch

import effcompile as ec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import cpu_bag_gemv as B
from effcompile.codegen.kernels import cpu_int4_gemv
from effcompile.compiler import ops as qops
from effcompile.testing import tiny_hf


def _packed_kernels(fast):
    return [k for k in ec.explain(fast).kernels if k.kind.startswith(("cpu-int4pack-mm", "cpu-int8pack-mm"))]


# Rows where bf16 keeps wq_linear's eager path: int4 at 2-7 (the C kernel at 1 and 8+) runs the packed matmul; int8
# past 8 (the row kernel to 8) its codes-in-x's-dtype matmul (the packed int8 matmul is for <= PACKED_MAX_ROWS).
@pytest.mark.parametrize("weights,group,rows,path", [("int4", 32, 5, "int4pack"), ("int8", None, 12, "int8-dense")])
def test_bf16_linears_keep_torchs_packed_matmul_and_fp32_ones_take_the_bag(weights, group, rows, path):
    cfg = ec.Quantize(weights=weights, group_size=group)
    if qops.packed_cpu_unavailable(weights, torch.bfloat16, 64):
        pytest.skip(qops.packed_cpu_unavailable(weights, torch.bfloat16, 64))
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, rows), generator=torch.Generator().manual_seed(0))
    before = qops.PATH_COUNTS["wq_linear"][path]
    fast = ec.effcompile(bf16, passes=[cfg], cache=False)
    ref = ec.effcompile(bf16, passes=[cfg], cache=False, use_triton=True)  # the dequant kernel, interpreted
    with torch.no_grad():
        out, want = fast(ids).logits, ref(ids).logits
    kernels = _packed_kernels(fast)  # 2 layers x (q/k/v, o, gate/up, down): FuseParallelLinears is default
    assert len(kernels) == 8 and {k.kind for k in kernels} == {f"cpu-{weights}pack-mm"}
    assert len([k for k in ec.explain(fast).kernels if k.ops[:1] == ("wq_linear",)]) == 8  # listed once each
    assert not [k for k in ec.explain(fast).kernels if k.name == B.NAME]
    assert qops.PATH_COUNTS["wq_linear"][path] == before + 8
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, err
    fp32 = ec.effcompile(tiny_hf("llama", layers=2, hidden=64), passes=[cfg], cache=False)
    with torch.no_grad():
        fp32(ids)
    if weights == "int8":  # fp32 int8: torch's packed op is slow there, the bag runs
        assert not _packed_kernels(fp32) and len([k for k in ec.explain(fp32).kernels if k.name == B.NAME]) == 8
    else:  # fp32 int4: codegen's C kernel where it builds (cpu_int4_gemv), else the bf16 packed op on x rounded
        kernel = cpu_int4_gemv.unavailable() is None  # to bf16 (ops.BF16_ACTIVATIONS)
        kinds = {k.kind for k in ec.explain(fp32).kernels if k.ops[:1] == ("wq_linear",)}
        assert kinds == {"cpu-int4-gemv" if kernel else "cpu-int4pack-mm-bf16x"}
        assert not [k for k in ec.explain(fp32).kernels if k.name == B.NAME]


@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_int8_decode_takes_the_row_kernel(rows):
    # 1-8 rows: cpu_float_gemv's kernel on the byte rows beat torch's packed int8 matmul (lower_cpu._int8_kernel_rows)
    if B.row_kernel("int8", torch.uint8) is False:
        pytest.skip("no C kernel here")
    cfg = ec.Quantize(weights="int8")
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, rows), generator=torch.Generator().manual_seed(0))
    before = cg_ops.PATH_COUNTS[B.NAME]["kernel"]
    fast = ec.effcompile(bf16, passes=[cfg], cache=False)
    ref = ec.effcompile(bf16, passes=[cfg], cache=False, use_triton=True)  # the dequant kernel, interpreted
    with torch.no_grad():
        out, want = fast(ids).logits, ref(ids).logits
    assert not _packed_kernels(fast)
    assert len([k for k in ec.explain(fast).kernels if k.name == B.NAME]) == 8
    assert cg_ops.PATH_COUNTS[B.NAME]["kernel"] == before + 8
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, err


def test_a_dynamic_batch_takes_the_row_kernel_in_buckets_of_at_most_8_rows():
    # Batch 1 then 16 then 8 sequences of one token: dynamo makes the batch symbolic, and each power-of-two bucket
    # compiles its own variant; lowering bounds the rows by the bucket (lower_common.max_rows): 9-16 keeps wq_linear's
    # eager path, 5-8 takes the kernel.
    if B.row_kernel("int8", torch.uint8) is False:
        pytest.skip("no C kernel here")
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    fast = ec.effcompile(bf16, passes=[ec.Quantize(weights="int8")], cache=False)
    counts = []
    with torch.no_grad():
        for batch in (1, 16, 8):
            before = cg_ops.PATH_COUNTS[B.NAME]["kernel"]
            fast(torch.randint(0, 128, (batch, 1), generator=torch.Generator().manual_seed(batch)))
            counts.append(cg_ops.PATH_COUNTS[B.NAME]["kernel"] - before)
    assert counts == [8, 0, 8]
    dynamic = ec.explain(fast).graphs[-1]
    assert dynamic.buckets == ["('9-16',)", "('5-8',)"]
    assert {k.kind for k in dynamic.kernels} == {"cpu-bag-gemv"}  # the last variant compiled: 5-8


def test_a_dynamic_int4_batch_takes_the_packed_matmul_in_a_bucket_of_3_4_rows():
    # bf16 weight-only int4: the C kernel at 1 and 8+ rows, torch's packed matmul at 2-7 (faster there). A dynamic batch
    # counts as its bucket's largest: 3-4 sequences the packed matmul, 5-8 the kernel.
    if cpu_int4_gemv.unavailable() is not None or qops.packed_cpu_unavailable("int4", torch.bfloat16, 64):
        pytest.skip("no C kernel or packed int4 matmul here")
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    fast = ec.effcompile(bf16, passes=[ec.Quantize(weights="int4", group_size=32)], cache=False)
    counts = []
    with torch.no_grad():
        for batch in (1, 4, 8):
            before = cg_ops.PATH_COUNTS[cpu_int4_gemv.NAME]["kernel"], qops.PATH_COUNTS["wq_linear"]["int4pack"]
            fast(torch.randint(0, 128, (batch, 1), generator=torch.Generator().manual_seed(batch)))
            counts.append((cg_ops.PATH_COUNTS[cpu_int4_gemv.NAME]["kernel"] - before[0],
                           qops.PATH_COUNTS["wq_linear"]["int4pack"] - before[1]))
    assert counts == [(8, 0), (0, 8), (8, 0)]
    assert ec.explain(fast).graphs[-1].buckets == ["('3-4',)", "('5-8',)"]


def test_without_the_c_kernel_bf16_int8_decode_keeps_the_packed_matmul(monkeypatch):
    from effcompile.codegen.kernels import cpu_float_gemv

    if qops.packed_cpu_unavailable("int8", torch.bfloat16, 64):
        pytest.skip(qops.packed_cpu_unavailable("int8", torch.bfloat16, 64))
    for attr, value in (("decided", True), ("fn", None), ("why", "CPU float GEMV kernel unavailable: test")):
        monkeypatch.setattr(cpu_float_gemv.KERNEL, attr, value)
    bf16 = tiny_hf("llama", layers=2, hidden=64).to(torch.bfloat16)
    fast = ec.effcompile(bf16, passes=[ec.Quantize(weights="int8")], cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0)))
    assert {k.kind for k in _packed_kernels(fast)} == {"cpu-int8pack-mm"} and len(_packed_kernels(fast)) == 8


def test_fp32_int4_rounds_only_x_to_bf16_and_returns_fp32():
    # The bf16 kernel's output against the reference with x rounded the same way: equal to bf16 accumulation's
    # error; against the fp32 reference, about 0.3 % (session 22: 0.28-0.29 % on Llama-3.2-1B shapes).
    gen = torch.Generator().manual_seed(0)
    qw = qops.quantize_weight(torch.randn(64, 256, generator=gen) / 16, "int4", 128)
    x = torch.randn(3, 256, generator=gen)
    if qops.packed_cpu_unavailable("int4", torch.float32, 64):
        pytest.skip(qops.packed_cpu_unavailable("int4", torch.float32, 64))
    got, path = qops._fast_cpu(x, *qw[:3], "int4", 128)
    assert path == "int4pack-bf16x" and got.dtype == torch.float32
    want = qops.reference(x, *qw[:3], None, "int4", 128)
    rounded = qops.reference(x.bfloat16().float(), *qw[:3], None, "int4", 128)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(got, rounded) < 5e-3 and 1e-4 < rel(got, want) < 1e-2


def test_int4_rows_over_eight_stay_packed():
    # int4 takes torch's packed matmul at any row count (faster than dequantizing), with fp32 x rounded to bf16;
    # int8 keeps it for decode-shaped calls (PACKED_MAX_ROWS), then with 16-bit x a plain matmul.
    gen = torch.Generator().manual_seed(0)
    qw = qops.quantize_weight(torch.randn(48, 96, generator=gen) / 10, "int4", 32)
    rows = qops.PACKED_MAX_ROWS + 4
    for dtype in (torch.bfloat16, torch.float32):  # fp32 x: rounded to bf16 for the same kernel
        got = qops._fast_cpu(torch.randn(rows, 96, generator=gen).to(dtype), *qw[:3], "int4", 32)
        assert got is not None and got[0].dtype == dtype, dtype
    qw8 = qops.quantize_weight(torch.randn(48, 96, generator=gen) / 10, "int8", 0)
    x8 = torch.randn(rows, 96, generator=gen).bfloat16()
    got, path = qops._fast_cpu(x8, *qw8[:3], "int8", 0)  # prefill rows: codes in bf16, one matmul, then scales
    want = qops.reference(x8, *qw8[:3], None, "int8", 0)
    assert path == "int8-dense" and ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    assert qops._fast_cpu(x8.float(), *qw8[:3], "int8", 0) is None  # fp32: the reference dequantization


def test_an_int4_weight_it_cannot_take_keeps_the_bag():
    assert "multiple of 16" in qops.packed_cpu_unavailable("int4", torch.bfloat16, 120)
    assert "lose to the bag" in qops.packed_cpu_unavailable("int8", torch.float32, 128)
    odd = tiny_hf("llama", layers=1, hidden=64, vocab=120).to(torch.bfloat16)  # the LM head: 120 outputs
    fast = ec.effcompile(odd, passes=[ec.Quantize(weights="int4", group_size=32, targets=("attn", "ffn", "head"))],
                         cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 120, (1, 3)))
    assert len(_packed_kernels(fast)) == 4  # the layer's four (fused) linears
    assert len([k for k in ec.explain(fast).kernels if k.name == B.NAME]) == 1  # the head
