"""The three pass-authoring tiers of docs/passes.md (examples/custom_passes.py) fire on real MiniLM."""

import sys
from pathlib import Path

import pytest
import torch

import effcompile as ec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import custom_passes as cp  # noqa: E402


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_declarative_rewrite_fires_once_per_block_and_is_exact(minilm, minilm_batch):
    model, _ = minilm
    fast = ec.effcompile(model, passes=[cp.DecomposeGelu()], cache=False, use_triton=False)  # kernels on CPU
    torch.testing.assert_close(_hidden(fast, minilm_batch), _hidden(model, minilm_batch), rtol=1e-4, atol=2e-4)
    (rec,) = [p for p in ec.explain(fast).graphs[0].passes if p.name == "DecomposeGelu"]
    assert rec.modified and rec.count == 6
    assert rec.where == [f"layers.{i}.ffn" for i in range(6)]
    # The rewritten erf form is what the fused kernels now compute.
    assert any("erf" in k.ops for k in ec.explain(fast).kernels)


def test_declarative_rewrite_does_not_fire_without_a_match():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    fast = ec.effcompile(model, passes=[cp.DecomposeGelu()], cache=False)
    x = torch.randn(2, 8)
    torch.testing.assert_close(fast(x), model(x))
    (rec,) = [p for p in ec.explain(fast).graphs[0].passes if p.name == "DecomposeGelu"]
    assert not rec.modified and rec.count == 0


def test_imperative_pass_rewrites_every_residual_and_identity_config_is_eager(minilm, minilm_batch):
    model, _ = minilm
    ref = _hidden(model, minilm_batch)
    same = ec.effcompile(model, passes=[cp.ScaleResidualAdds(1.0)], cache=False)
    torch.testing.assert_close(_hidden(same, minilm_batch), ref, rtol=1e-4, atol=2e-4)
    assert not [p for p in ec.explain(same).graphs[0].passes if p.name == "scale_residual_adds"][0].modified
    scaled = ec.effcompile(model, passes=[cp.ScaleResidualAdds(0.5)], cache=False)
    out = _hidden(scaled, minilm_batch)
    (rec,) = [p for p in ec.explain(scaled).graphs[0].passes if p.name == "scale_residual_adds"]
    assert rec.count == 12 and not torch.allclose(out, ref, atol=1e-2)
    with pytest.raises(ValueError, match="scale"):
        cp.ScaleResidualAdds(0.0)


def test_calibrated_pass_uses_calibration_data_and_records_its_decisions(minilm, minilm_batch):
    model, tok = minilm
    calib = [dict(tok([t], return_tensors="pt")) for t in ("Calibration text one.", "And a second, longer one.")]
    with pytest.raises(ValueError, match="calibration= is required by pass"):
        ec.effcompile(model, passes=[cp.ClipActivations(0.99)])
    fast = ec.effcompile(model, passes=[cp.ClipActivations(0.9999)], calibration=calib, cache=False)
    out, ref = _hidden(fast, minilm_batch), _hidden(model, minilm_batch)
    (rec,) = [p for p in ec.explain(fast).graphs[0].passes if p.name == "clip_activations"]
    assert rec.count == 6 and len(rec.artifacts["clip"]) == 6
    assert all(c > 0 for c in rec.artifacts["clip"].values())
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1))
    assert cos.min() > 0.95  # clipping 0.01% of FFN activations is lossy, but mildly (BERT outliers matter)
    # quantile=1.0 is the degenerate setting: nothing clipped, eager results.
    keep = ec.effcompile(model, passes=[cp.ClipActivations(1.0)], calibration=calib, cache=False)
    torch.testing.assert_close(_hidden(keep, minilm_batch), ref, rtol=1e-4, atol=2e-4)
