"""Differential fuzzing in fp16 / bf16 and with non-contiguous inputs: the exact pipeline equals eager."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks import Block, block_specs, build, rmse  # noqa: E402

FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True, max_examples=10,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Same dtype on both sides: the compiled graph runs the same ATen ops in the same precision except the
# bias moved out of addmm (one extra rounding in fp16/bf16). Loose elementwise bounds, and the oracle that
# matters: the compiled output is no further from an fp64 run than eager is (2x its RMSE + a few ulp).
TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=8e-2, rtol=8e-2)}
ULP = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view with a stride-2 last dimension."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    view = wide[..., ::2]
    view.copy_(x)
    assert not view.is_contiguous()
    return view


@settings(**FUZZ)
@given(spec=block_specs(), dtype=st.sampled_from([torch.float16, torch.bfloat16]), strided=st.booleans())
def test_low_precision_and_strided_blocks_equal_eager(spec, dtype, strided):
    import effcompile as ec

    model, x = build(spec)
    gold_model = Block(spec).double().eval()
    gold_model.load_state_dict(model.state_dict())
    model = model.to(dtype)
    x = x.to(dtype)
    if strided:
        x = _non_contiguous(x)
    torch._dynamo.reset()
    fast = ec.effcompile(model, cache=False, use_triton=False)  # kernels on CPU: their reference path
    with torch.no_grad():
        out, ref, gold = fast(x), model(x), gold_model(x.double())
    msg = f"{spec!r} {dtype} strided={strided}\n{ec.explain(fast)}"
    assert out.shape == ref.shape and out.dtype == dtype, msg
    assert torch.isfinite(out).all() == torch.isfinite(ref).all(), msg
    torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"{m}\n{msg}")
    assert rmse(out, gold) <= 2 * rmse(ref, gold) + ULP[dtype] * gold.abs().mean().item(), msg
    assert ec.explain(fast).kernels, msg
