"""FuseParallelLinears: quantized linears sharing an input (Q/K/V, gate/up) run as one wq_linear + slices (exact)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import effcompile as ec
from effcompile.codegen import ops as cg_ops
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.passes.fuse_parallel_linears import FuseParallelLinears
from effcompile.testing import tiny_hf

Q4 = ec.Quantize(weights="int4", group_size=32)


@pytest.fixture(scope="module")
def llama():
    return tiny_hf("llama", layers=2, hidden=64)


def _record(fast):
    return [p for g in ec.explain(fast).graphs for p in g.passes if p.name == "fuse_parallel_linears"]


def _wq_nodes(fast) -> int:
    """Quantized linears the lowered graphs run (each is one kernel launch)."""
    return sum(1 for k in ec.explain(fast).kernels if k.ops and k.ops[0] == "wq_linear")


def _buffer_bytes(fast) -> int:
    return sum(b.numel() * b.element_size() for g in ec.explain(fast).graphs for gm in g.graph_modules()
               for b in gm.buffers())


def _run(model, passes, ids):
    fast = ec.effcompile(model, passes=passes, cache=False)
    with torch.no_grad():
        out = fast(ids)
    return fast, getattr(out, "logits", out)


@pytest.mark.parametrize("weights,group", [("int8", None), ("int4", 32)])
def test_qkv_and_gate_up_fuse_and_match_the_unfused_graph(llama, weights, group):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    q = ec.Quantize(weights=weights, group_size=group)
    fused, out = _run(llama, [q], ids)
    plain, ref = _run(llama, [q, FuseParallelLinears(enabled=False)], ids)
    (rec,) = _record(fused)
    assert rec.modified and rec.count == 4  # per layer: q/k/v and gate/up
    assert rec.where == ["layers.0.attn: 3 linears", "layers.0.ffn: 2 linears",
                         "layers.1.attn: 3 linears", "layers.1.ffn: 2 linears"]
    assert _wq_nodes(fused) == 2 * 4 and _wq_nodes(plain) == 2 * 7  # qkv, o, gate_up, down per layer
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The per-projection packed weights are gone, not kept beside the concatenated ones (a copy would make
    # it ~1.7x; per-linear side buffers of the CPU layout make it slightly less; int4's CPU kernel pads each
    # linear's outputs to 256, so three tiny unfused projections pad more than their fused one).
    low = 0.5 if weights == "int4" else 0.9
    assert low * _buffer_bytes(plain) <= _buffer_bytes(fused) <= _buffer_bytes(plain)


@pytest.mark.interpreter
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_kernels_read_the_strided_slices(llama, batch, monkeypatch):
    # Triton path (interpreter): the fused GEMV writes [B, T, N_q + N_k + N_v]; the generated RoPE / SiLU-mul
    # kernels read its slices and their head views in place (ops.row_layout) instead of copying them.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = torch.randint(0, 128, (batch, 1), generator=torch.Generator().manual_seed(batch))
    before = cg_ops.PATH_COUNTS[D.NAME]["triton"]
    fused, out = _run(llama, [Q4], ids)
    assert cg_ops.PATH_COUNTS[D.NAME]["triton"] - before == 2 * 4
    _, ref = _run(llama, [Q4, FuseParallelLinears(enabled=False)], ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    report = str(ec.explain(fused))
    assert "non-contiguous input" not in report, report


def test_float_linears_are_not_fused(llama):
    fast, _ = _run(llama, None, torch.randint(0, 128, (1, 4)))
    (rec,) = _record(fast)
    assert not rec.modified and rec.count == 0


def test_eora_side_paths_keep_their_linears_apart(llama):
    gen = torch.Generator().manual_seed(4)
    calib = [(torch.randint(0, 128, (2, 8), generator=gen),) for _ in range(2)]
    torch._dynamo.reset()
    fast = ec.effcompile(llama, passes=[ec.Quantize(weights="int4", group_size=32, eora_rank=2)],
                         calibration=calib, cache=False)
    with torch.no_grad():
        fast(torch.randint(0, 128, (2, 8), generator=gen))
    (rec,) = _record(fast)
    assert not rec.modified and "EoRA side path" in rec.note


class _Flattening(nn.Module):
    """Two linears on one input whose outputs are flattened with .view: a slice of a wider row cannot."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 48)

    def forward(self, x):
        return torch.cat([self.a(x).view(-1), self.b(x).view(-1)])


def test_a_consumer_that_cannot_take_slices_undoes_the_rewrite():
    torch.manual_seed(0)
    model = _Flattening().eval()
    x = torch.randn(2, 3, 64)
    fast, out = _run(model, [ec.Quantize(weights="int8", targets=("other",))], x)
    (rec,) = _record(fast)
    assert not rec.modified and "shape propagation failed" in rec.note
    assert _wq_nodes(fast) == 2
    _, ref = _run(model, [ec.Quantize(weights="int8", targets=("other",)), FuseParallelLinears(enabled=False)], x)
    torch.testing.assert_close(out, ref)


def test_row_layout():
    base = torch.arange(60.0).view(2, 3, 10)
    assert cg_ops.row_layout(base) == (1, 0, 10)
    assert cg_ops.row_layout(base[..., 2:6]) == (1, 0, 10)  # a slice of a wider row
    step = torch.arange(30.0).view(3, 1, 10)  # one decode token per sequence
    heads = step[..., 2:10].view(3, 1, 2, 4).transpose(1, 2)  # [B, H, T=1, D] of a slice: two levels
    layout = cg_ops.row_layout(heads)
    assert layout == (2, 4, 10)
    flat, rows = step.view(-1), heads.reshape(-1, 4)
    for i in range(rows.shape[0]):  # every row starts where the layout says
        start = 2 + (i // layout[0]) * layout[2] + (i % layout[0]) * layout[1]
        assert torch.equal(flat[start:start + 4], rows[i])
    assert cg_ops.row_layout(base[..., :8].view(2, 3, 2, 4).transpose(1, 2)) is None  # T=3: three levels
    assert cg_ops.row_layout(base.transpose(1, 2)) is None  # the last dim is not unit-stride


# -- thresholded (sparse) linears ------------------------------------------------------------------------


def _sparse_run(model, passes, ids, calib):
    torch._dynamo.reset()
    fast = ec.effcompile(model, passes=passes, calibration=calib, cache=False)
    with torch.no_grad():
        out = fast(ids)
    return fast, getattr(out, "logits", out)


def _sparse_nodes(fast) -> int:
    """Thresholded linears the lowered graphs run (each one kernel launch)."""
    return sum(1 for k in ec.explain(fast).kernels if k.ops and k.ops[0] == "sparse_linear")


@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_sparse_linears_sharing_input_and_threshold_fuse(llama, weights, monkeypatch):
    # Per-tensor thresholds of Q/K/V (and gate/up) are the same quantile of the same input: one sparse GEMV.
    from effcompile.compiler import ops as qops
    from effcompile.compiler.sparse_ops import measure_sparsity
    from effcompile.passes.threshold_channels import thresholds

    # fp32 int4 on the CPU would stay unfused for torch's packed kernel (ops.BF16_ACTIVATIONS): keep it sparse here.
    monkeypatch.setattr(qops, "BF16_ACTIVATIONS", set())

    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 128, (2, 8), generator=gen),) for _ in range(2)]
    ids = torch.randint(0, 128, (2, 8), generator=gen)  # shaped like the calibration batches
    passes = [ec.ThresholdChannels(sparsity=0.5)] + ([ec.Quantize(weights=weights, group_size=32 if
                                                                  weights == "int4" else None)] if weights else [])
    fused, out = _sparse_run(llama, passes, ids, calib)
    with torch.no_grad(), measure_sparsity() as got_fused:
        fused(ids)
    (rec,) = _record(fused)
    n_fused, live = _sparse_nodes(fused), thresholds(fused)  # before another compile: explain holds graphs weakly
    plain, ref = _sparse_run(llama, [*passes, FuseParallelLinears(enabled=False)], ids, calib)
    with torch.no_grad(), measure_sparsity() as got_plain:
        plain(ids)
    assert rec.modified and rec.where == ["layers.0.attn: 3 linears", "layers.0.ffn: 2 linears",
                                          "layers.1.attn: 3 linears", "layers.1.ffn: 2 linears"]
    assert n_fused == 2 * 4 and _sparse_nodes(plain) == 2 * 7
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Achieved sparsity is still reported per original linear, the same as without the fusion.
    assert got_fused.keys() == got_plain.keys() and len(got_fused) == 2 * 7
    assert all(abs(got_fused[k] - got_plain[k]) < 1e-9 for k in got_plain)
    # The live thresholds: one per original label; fused parts share the buffer.
    assert live.keys() == thresholds(plain).keys()
    q, k = (live[name] for name in sorted(live) if name.endswith(("q_proj", "k_proj")) and ".0." in name)
    assert q is k


def test_sparse_linears_with_different_thresholds_stay_apart(llama):
    # Per-channel (CHESS) thresholds scale by each linear's own weight column norms: Q's differ from K's.
    gen = torch.Generator().manual_seed(6)
    calib = [(torch.randint(0, 128, (2, 8), generator=gen),) for _ in range(2)]
    ids = torch.randint(0, 128, (2, 8), generator=gen)  # shaped like the calibration batches
    fast, out = _sparse_run(llama, [ec.ThresholdChannels(sparsity=0.5, method="channel")], ids, calib)
    (rec,) = _record(fast)
    assert not rec.modified and _sparse_nodes(fast) == 2 * 7
    _, ref = _sparse_run(llama, [ec.ThresholdChannels(sparsity=0.5, method="channel"),
                                 FuseParallelLinears(enabled=False)], ids, calib)
    torch.testing.assert_close(out, ref)


@pytest.mark.interpreter
def test_fused_sparse_int4_gemv_matches_unfused_on_the_triton_path(llama, monkeypatch):
    # The sparse GEMV on the fused input-major int4 layout (codes and [K / G, N] scales stacked along N),
    # one decode token: 8 launches instead of 14, the same logits.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from effcompile.codegen.kernels import sparse_gemv as S

    gen = torch.Generator().manual_seed(7)
    calib = [(torch.randint(0, 128, (1, 1), generator=gen),) for _ in range(4)]
    ids = torch.randint(0, 128, (1, 1), generator=gen)
    passes = [ec.ThresholdChannels(sparsity=0.5), ec.Quantize(weights="int4", group_size=32)]
    launches, logits = [], []
    for extra in ([], [FuseParallelLinears(enabled=False)]):
        before = cg_ops.PATH_COUNTS[S.NAME]["triton"]
        logits.append(_sparse_run(llama, passes + extra, ids, calib)[1])
        launches.append(cg_ops.PATH_COUNTS[S.NAME]["triton"] - before)
    assert launches == [2 * 4, 2 * 7]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
