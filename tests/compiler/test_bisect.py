"""The bisector names the first pass (or codegen) that pushes a model's output beyond tolerance."""

import sys
from pathlib import Path

import pytest
import torch

from effcompile import RemoveDropout
from effcompile.compiler.bisect import bisect

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
import custom_passes as cp  # noqa: E402
from blocks import BlockSpec, build  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def block():
    # Two layers in a ModuleList: residual adds get sublayer tags, so ScaleResidualAdds has targets.
    return build(BlockSpec(hidden=40, heads=4, kv_heads=2, act="gelu", layers=2, seq=5))


def test_lossy_pass_after_exact_ones_is_named(block):
    model, x = block
    exact_then_lossy = [cp.ScaleResidualAdds(1.0), cp.ScaleResidualAdds(0.5), cp.DecomposeGelu()]
    r = bisect(model, (x,), exact_then_lossy, **TOL)
    names = [s.name for s in r.stages]
    # Phase order: canonicalize (the default remove_* passes) -> semantic (both scales) -> fuse (the default
    # fuse passes, then the rewrite) -> codegen.
    assert names == ["captured", "remove_dropout", "remove_unused_factories", "scale_residual_adds",
                     "scale_residual_adds", "fuse_sparse_linear", "fuse_parallel_linears", "fuse_gated_activation",
                     "grouped_query_attention",
                     "additive_attention_mask", "fuse_cache_writes", "fuse_rotary_qk", "fuse_rope_cache_write", "DecomposeGelu",
                     "codegen"], str(r)
    assert r.culprit is r.stages[4] and r.culprit.config == "ScaleResidualAdds(scale=0.5)", str(r)
    assert all(s.ok for s in r.stages[:4]) and r.stages[1].fired and not r.stages[3].fired, str(r)
    assert r.culprit.ratio > 1 and "BEYOND TOLERANCE" in str(r)
    assert "first stage beyond tolerance: scale_residual_adds ScaleResidualAdds(scale=0.5)" in str(r)


def test_exact_pipeline_is_within_tolerance_through_codegen(block):
    model, x = block
    r = bisect(model, {"x": x}, [cp.DecomposeGelu()], use_triton=False, **TOL)  # kernels on CPU
    assert r.culprit is None, str(r)
    assert r.stages[-1].name == "codegen" and r.stages[-1].fired and "kernel(s)" in r.stages[-1].note, str(r)
    assert "every stage is within tolerance" in str(r)


def test_a_wrong_codegen_is_named(block, monkeypatch):
    import effcompile.codegen.lower as lower_mod

    real = lower_mod.lower

    def off_by_a_bit(gm, *a, **k):  # a codegen bug that changes results: scales the graph's output
        res = real(gm, *a, **k)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            bad = gm.graph.call_function(torch.mul, (out.args[0][0], 1.01))
        out.args = ((bad, *out.args[0][1:]),)  # dynamo graphs return a tuple
        gm.recompile()
        return res

    monkeypatch.setattr(lower_mod, "lower", off_by_a_bit)
    model, x = block
    r = bisect(model, (x,), [RemoveDropout()], **TOL)
    assert r.culprit is not None and r.culprit.name == "codegen", str(r)
    assert all(s.ok for s in r.stages[:-1]), str(r)


def test_calibrated_pass_is_bisected_with_its_calibration(block):
    model, x = block
    calib = [(torch.randn(1, 7, 40, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    with pytest.raises(ValueError, match="calibration= is required"):
        bisect(model, (x,), [cp.ClipActivations(0.5)], **TOL)
    r = bisect(model, (x,), [cp.ClipActivations(0.5)], calibration=calib, **TOL)
    assert r.culprit is not None and r.culprit.name == "clip_activations", str(r)


def test_bad_arguments():
    with pytest.raises(TypeError, match="callable"):
        bisect(42, (torch.randn(2),))
    with pytest.raises(ValueError, match="atol"):
        bisect(torch.nn.Linear(2, 2), (torch.randn(2),), atol=-1)


def test_cli_names_the_lossy_pass(capsys):
    from effcompile import cli

    spec = "remove_dropout+scale_residual_adds(scale=0.5)"
    try:  # the bench spec names passes in snake_case; without effcompile.bench, Python-like class calls
        import effcompile.bench.spec  # noqa: F401
    except ImportError:
        spec = "RemoveDropout()+ScaleResidualAdds(scale=0.5)"
    code = cli.main(["bisect", "gpt2-tiny", "--batch", "1", "--seq", "5", "--passes", spec,
                     "--import", str(ROOT / "examples" / "custom_passes.py"), "--no-triton"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "first stage beyond tolerance: scale_residual_adds ScaleResidualAdds(scale=0.5)" in out, out
    assert "codegen" in out
    with pytest.raises(SystemExit, match="no_such_pass|cannot parse"):
        cli.main(["bisect", "gpt2-tiny", "--passes", "no_such_pass"])
