"""Rows of docs/errors.md that no other test proves: each bad input gets a clear error or a visible fallback."""

from dataclasses import dataclass

import pytest
import torch

import effcompile as ec
from effcompile.compiler.pass_manager import PassConfig, register_pass


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):  # two fusion groups: bias+relu+residual+LayerNorm, then softmax
        return torch.softmax(self.out(self.norm(torch.relu(self.fc(x)) + x)), -1)


def _run(fast, x):
    with torch.no_grad():
        return fast(x)


def test_backend_calibration_option_points_to_the_call_form():
    bad = torch.compile(_Net(), backend="effcompile", options={"calibration": [torch.randn(2, 16)]})
    with pytest.raises(Exception, match=r"options\['calibration'\] is not supported.*effcompile\.effcompile"):
        bad(torch.randn(2, 16))


def test_bad_setting_types_and_values():
    with pytest.raises(ValueError, match="use_triton must be None, True or False"):
        ec.effcompile(_Net(), use_triton="yes")
    with pytest.raises(TypeError, match="passes must be a list of pass configs"):
        ec.effcompile(_Net(), passes=ec.RemoveDropout())


@dataclass(frozen=True)
class _Unregistered(PassConfig):
    pass


def test_unregistered_config_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"no pass registered for _Unregistered; registered: \[.*RemoveDropout"):
        ec.effcompile(_Net(), passes=[_Unregistered()])


def test_register_pass_refuses_mutable_configs_and_unknown_phases():
    @dataclass
    class Mutable:  # a non-frozen dataclass: unhashable, so it could not be part of a cache key
        x: int = 0

    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        register_pass(Mutable)
    with pytest.raises(ValueError, match="phase='late' is not one of"):
        register_pass(_Unregistered, phase="late")


def test_explain_before_the_first_call_of_a_torch_compiled_model():
    fast = torch.compile(_Net(), backend="effcompile")
    with pytest.raises(ValueError, match="call it once before explain"):
        ec.explain(fast)


@dataclass(frozen=True)
class _Explodes(PassConfig):
    pass


@register_pass(_Explodes, phase="semantic")
def _explodes(gm, cfg, ctx):
    raise RuntimeError("boom")


def test_a_failing_pass_is_named_in_the_error():
    # dynamo wraps backend errors (BackendCompilerFailed); the message still names the pass and config.
    with pytest.raises(Exception, match=r"pass _explodes \(_Explodes\) failed: boom; ran before: "
                                        r"\['remove_dropout', 'remove_unused_factories'\]"):
        _run(ec.effcompile(_Net(), passes=[_Explodes()], cache=False), torch.randn(2, 16))


def test_one_kernel_failing_is_a_partial_visible_fallback(monkeypatch):
    import effcompile.codegen.lower as lower_mod

    real = lower_mod.generate

    def no_softmax(group):
        if any(group.specs[n].op == "softmax" for n in group.nodes):
            raise RuntimeError("simulated generator bug")
        return real(group)

    monkeypatch.setattr(lower_mod, "generate", no_softmax)
    model, x = _Net(), torch.randn(3, 16)
    fast = ec.effcompile(model, cache=False, use_triton=False)  # kernels even on CPU
    torch.testing.assert_close(_run(fast, x), _run(model, x))
    g = ec.explain(fast).graphs[0]
    assert g.kernels and not any("softmax" in k.ops for k in g.kernels), str(ec.explain(fast))
    assert any("kernel generation failed: simulated generator bug" in why for _, why in g.fallbacks)
    assert "not fused:" in str(ec.explain(fast))


def test_a_new_dtype_or_rank_recompiles_instead_of_reusing_the_graph():
    model = _Net()
    fast = ec.effcompile(model, cache=False)
    x = torch.randn(3, 16)
    _run(fast, x)
    for other in (torch.randn(2, 3, 16), x.double()):
        if other.dtype == torch.float64:
            model.double()
        torch.testing.assert_close(_run(fast, other), _run(model, other))
    assert len(ec.explain(fast).graphs) == 3, str(ec.explain(fast))
