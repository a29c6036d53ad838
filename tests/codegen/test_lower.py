"""Lowering: Before/After structure, numerics vs eager (torch and interpreter paths), negatives, dynamic shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cg_util import capture, capture_compiled, targets

from effcompile.codegen import ops
from effcompile.codegen.lower import KernelRecord, load_kernels, lower
from effcompile.codegen.partition import MAX_BLOCK
from effcompile.compiler.ir import TAG, check_invariants


class Mlp(nn.Module):
    def __init__(self, d=24, h=40):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, h), nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.fc2(F.gelu(self.fc1(x))) + x)  # BERT's FFN: bias+gelu, bias+residual+LN


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.mlp = Mlp(d)

    def forward(self, x):
        return self.mlp(x)


class Stack(nn.Module):
    def __init__(self, n=2, d=24):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@torch.no_grad()
def test_mlp_before_after_structure_and_numerics(tmp_path, monkeypatch):
    model = Mlp().eval()
    x = torch.randn(2, 5, 24)
    gm, compiled, _ = capture_compiled(model, x)
    before = targets(gm)
    assert before.count("linear") == 2 and "gelu" in before and "layer_norm" in before
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lowered for Triton: biases split into epilogues
    res = lower(gm, tmp_path, use_triton=None)
    monkeypatch.delenv("TRITON_INTERPRET")  # ... and run through the kernels' torch path below
    check_invariants(gm)
    after = targets(gm)
    assert len([t for t in after if t.startswith("epilogue_")]) == 2
    assert "gelu" not in after and "layer_norm" not in after and "add" not in after
    assert after.count("linear") == 2
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch._C._nn.linear, F.linear):
            assert len(n.args) == 2 and n.kwargs.get("bias") is None, "bias moved into the epilogue"
    assert [k.kind for k in res.kernels] == ["epilogue", "epilogue"]
    assert res.kernels[0].ops == ("add", "gelu")
    assert res.kernels[1].ops == ("add", "add", "layer_norm")
    for k in res.kernels:
        assert isinstance(k, KernelRecord) and Path(k.source_path).is_file()
        assert k.op == f"torch.ops.effcompile.{k.name}.default"
        assert eval(k.op, {"torch": torch}) in {n.target for n in gm.graph.nodes}
        assert "@triton.jit" in Path(k.source_path).read_text()
    fused = [
        n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    ]
    assert all(TAG in n.meta and "val" in n.meta for n in fused)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@torch.no_grad()
def test_mlp_numerics_interpreter_path(tmp_path):
    model = Mlp().eval()
    x = torch.randn(3, 7, 24)
    gm, compiled, _ = capture_compiled(model, x)
    res = lower(gm, tmp_path, use_triton=True)
    before = {k.name: ops.PATH_COUNTS[k.name]["triton"] for k in res.kernels}
    torch.testing.assert_close(compiled(x), model(x), rtol=2e-5, atol=2e-5)
    assert all(ops.PATH_COUNTS[k.name]["triton"] == before[k.name] + 1 for k in res.kernels)


@torch.no_grad()
def test_identical_layers_share_one_kernel(tmp_path):
    model = Stack(2).eval()
    x = torch.randn(2, 3, 24)
    gm, compiled, _ = capture_compiled(model, x)
    res = lower(gm, tmp_path, use_triton=False)
    assert len(res.kernels) == 4 and len({k.name for k in res.kernels}) == 2
    assert {k.sublayers for k in res.kernels} == {("layers.0.ffn",), ("layers.1.ffn",)}
    assert len(list(Path(tmp_path).glob("*.py"))) == 2
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # Lowering again (second load from the same or another dir) is idempotent and deterministic.
    gm2 = capture(model, x)
    res2 = lower(gm2, tmp_path / "again", use_triton=False)
    assert [k.name for k in res2.kernels] == [k.name for k in res.kernels]
    assert load_kernels(sorted(Path(tmp_path).glob("*.py"))) == sorted({k.name for k in res.kernels})


def _rms_norm(x, w):
    # Llama's RMSNorm: a row statistic [..., 1] feeding an add, an rsqrt and a broadcast multiply.
    var = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype)


@pytest.mark.parametrize("triton", [False, pytest.param(True, marks=pytest.mark.interpreter)], ids=["torch", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (1, 24)], ids=["one-row", "three-rows", "one-row-2d"])
def test_rms_norm_is_one_reduction_kernel_even_for_one_row(tmp_path, monkeypatch, shape, triton):
    # Batch-1 decode has one row: its [1, 1, 1] variance is a row statistic and a scalar at once. Taken as a
    # scalar, the add / rsqrt after the mean had no per-row input and the norm became 3 kernels.
    if triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = torch.randn(shape), torch.randn(24)
    gm = capture(_rms_norm, x, w)
    res = lower(gm, tmp_path, use_triton=triton)
    assert [k.kind for k in res.kernels] == ["reduction"]
    assert {"mean", "rsqrt", "add"} <= set(res.kernels[0].ops)
    assert not res.fallbacks
    runs = ops.PATH_COUNTS[res.kernels[0].name]["triton" if triton else "torch"]
    torch.testing.assert_close(gm(x, w)[0], _rms_norm(x, w), rtol=1e-5, atol=1e-6)
    assert ops.PATH_COUNTS[res.kernels[0].name]["triton" if triton else "torch"] == runs + 1


def _rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)  # q cos + rotate_half(q) sin, rotate_half a cat of negated halves


@pytest.mark.parametrize("triton", [False, pytest.param(True, marks=pytest.mark.interpreter)], ids=["torch", "triton"])
@pytest.mark.parametrize("batch", [1, 3])
def test_rope_with_rotate_half_is_one_kernel(tmp_path, monkeypatch, batch, triton):
    pytest.importorskip("transformers")
    if triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # A decode step's head views of the projections: [b, heads, 1, 16] transposed from [b, 1, heads, 16]. (With
    # more positions cos/sin vary per row but not per head, an outer broadcast: rotate_half fuses alone.)
    q, k = torch.randn(batch, 1, 4, 16).transpose(1, 2), torch.randn(batch, 1, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    gm, compiled, _ = capture_compiled(_rope, q, k, cos, sin)
    assert {"neg", "cat", "getitem"} <= set(targets(gm))
    res = lower(gm, tmp_path, use_triton=triton)
    assert [kk.ops for kk in res.kernels] == [("mul", "rotate_half", "mul", "add")] * 2
    assert not {"neg", "cat", "getitem"} & set(targets(gm))  # the halves and their negation are gone
    runs = ops.PATH_COUNTS[res.kernels[0].name]["triton" if triton else "torch"]
    for got, want in zip(compiled(q, k, cos, sin), _rope(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # fp32: the same products and sums as eager
    assert ops.PATH_COUNTS[res.kernels[0].name]["triton" if triton else "torch"] == runs + 2


def _swapped(x):
    return torch.cat((x[..., :8], -x[..., 8:]), -1)  # the halves in place, negated second: no rotation


def _uneven(x):
    return torch.cat((-x[..., 6:], x[..., :6]), -1)  # split off the middle


def _first_dim(x):
    return torch.cat((-x[2:], x[:2]), 0)


@pytest.mark.parametrize("fn", [_swapped, _uneven, _first_dim])
def test_other_cats_are_not_rotate_half(tmp_path, fn):
    x = torch.randn(4, 16)
    gm, compiled, _ = capture_compiled(fn, x)
    res = lower(gm, tmp_path, use_triton=False)
    assert all("rotate_half" not in kk.ops for kk in res.kernels)
    assert "cat" in targets(gm)
    torch.testing.assert_close(compiled(x), fn(x))


def test_rotate_half_keeps_a_negation_that_has_other_readers(tmp_path):
    def f(x):
        neg = -x[..., 8:]
        return torch.cat((neg, x[..., :8]), -1) * 2.0, neg

    x = torch.randn(3, 16)
    gm, compiled, _ = capture_compiled(f, x)
    res = lower(gm, tmp_path, use_triton=False)
    assert ("rotate_half", "mul") in [kk.ops for kk in res.kernels]
    for got, want in zip(compiled(x), f(x), strict=True):
        torch.testing.assert_close(got, want)


def test_attention_mask_broadcast_is_not_fused(tmp_path):
    def attn(scores, mask):
        return torch.softmax(scores + mask, dim=-1)

    scores, mask = torch.randn(2, 3, 5, 5), torch.zeros(2, 1, 1, 5)
    mask[1, ..., -2:] = float("-inf")
    gm = capture(attn, scores, mask)
    res = lower(gm, tmp_path, use_triton=False)
    assert [k.ops for k in res.kernels] == [("softmax",)]  # the lone softmax still gets a kernel
    reasons = dict(res.fallbacks)
    assert "broadcast" in reasons["add"]
    assert "add" in targets(gm)
    torch.testing.assert_close(gm(scores, mask)[0], attn(scores, mask))


def test_non_last_dim_reduction_and_trivial_cast_are_not_kernels(tmp_path):
    def f(x):
        return x.sum(0, keepdim=True), x.to(torch.float16)

    x = torch.randn(4, 6)
    gm = capture(f, x)
    res = lower(gm, tmp_path, use_triton=False)
    assert res.kernels == []
    reasons = dict(res.fallbacks)
    assert "other than the last" in reasons["sum_1"]
    assert "trivial" in reasons["to"]
    assert targets(gm) == ["sum", "to"]


def test_row_too_wide_is_a_fallback(tmp_path):
    gm = capture(lambda x: torch.relu(x), torch.randn(1, MAX_BLOCK + 1))
    res = lower(gm, tmp_path, use_triton=False)
    assert res.kernels == [] and "MAX_BLOCK" in res.fallbacks[0][1]


@pytest.mark.interpreter
def test_path_leaving_and_reentering_is_split(tmp_path):
    """h feeds both the kernel's tail and a matmul that feeds it: fusing all would create a cycle."""

    def f(x, w):
        h = x + 1.0
        return torch.relu(h @ w) * h

    x, w = torch.randn(3, 8), torch.randn(8, 8)
    gm = capture(f, x, w)
    res = lower(gm, tmp_path, use_triton=True)
    assert sorted(k.ops for k in res.kernels) == [("add",), ("relu", "mul")]
    gm.graph.lint()
    torch.testing.assert_close(gm(x, w)[0], f(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_fused_output_read_before_group_end_is_reordered(tmp_path):
    """An output used by an unfused op placed between group nodes: the graph is re-sorted, not broken."""

    def f(x, y):
        a = torch.sigmoid(x)
        b = a @ y.t()  # not fusible, reads a mid-group output
        c = a * torch.exp(x)
        return b, c

    x, y = torch.randn(4, 6), torch.randn(5, 6)
    gm = capture(f, x, y)
    res = lower(gm, tmp_path, use_triton=True)
    assert [k.ops for k in res.kernels] == [("sigmoid", "exp", "mul")]
    for got, want in zip(gm(x, y), f(x, y), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@torch.no_grad()
def test_dynamic_seq_len(tmp_path, monkeypatch):
    model = Mlp().eval()
    x = torch.randn(2, 5, 24)
    gm, compiled, graphs = capture_compiled(model, x, dynamic_dims={0: 1})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # else CPU lowering leaves the row ops to torch
    res = lower(gm, tmp_path, use_triton=None)
    fused = [
        n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    ]
    assert len(fused) == 2 and not isinstance(fused[0].meta["val"].shape[1], int)  # symbolic seq dim kept
    for seq in (3, 11):
        x = torch.randn(2, seq, 24)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        n_before = ops.PATH_COUNTS[res.kernels[0].name]["triton"]
        torch.testing.assert_close(compiled(x), model(x), rtol=2e-5, atol=2e-5)
        assert ops.PATH_COUNTS[res.kernels[0].name]["triton"] == n_before + 1
    assert len(graphs) == 1, "no recompile: one graph served both lengths"


def test_torch_path_lowering_keeps_addmm(tmp_path):
    # use_triton=False: every kernel runs torch, so splitting the bias off the linear would only turn
    # one addmm into a matmul + an add; the linears stay whole and the activations still fuse.
    model = Mlp().eval()
    x = torch.randn(2, 5, 24)
    gm, compiled, _ = capture_compiled(model, x)
    res = lower(gm, tmp_path, use_triton=False)
    assert "epilogue" not in [k.kind for k in res.kernels] and res.kernels
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch._C._nn.linear, F.linear)]
    assert len(linears) == 2 and all(len(n.args) == 3 for n in linears)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
