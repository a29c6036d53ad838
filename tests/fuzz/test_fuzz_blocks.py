"""Differential fuzzing: random transformer-ish blocks through effcompile's exact pipeline equal eager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks import block_specs, check_block, kernel_inputs  # noqa: E402

from effcompile.codegen import ops  # noqa: E402

# derandomize: the same examples on every run and machine (a CI failure reproduces locally), and no
# example database, so a failure found once is not silently replayed from local state only.
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Exact pipeline on CPU: the generated kernels' torch path runs the graph's own ATen ops, and the
# only reassociation is a linear's bias moved out of addmm into the fused epilogue (a few fp32 ulp;
# outputs here are O(1)-O(10)). 1e-5 is the end-to-end suite's bound and ~100x that slack.
ATOL = RTOL = 1e-5
# Generated Triton kernel vs its own eager reference: erf/exp/rsqrt and reduction order differ from
# ATen by a few ulp (same bound as tests/codegen/test_kernels_interpreter.py).
KTOL = dict(atol=2e-5, rtol=2e-5, equal_nan=True)

_CHECKED: set[str] = set()  # kernels are content-named: one shape check per distinct kernel is enough
STATS = {"blocks": 0, "kernels": 0, "kernel_shapes": 0}


def _check_kernels(kernels, data) -> None:
    for k in kernels:
        if not k.source_path.endswith(".py") or "/codegen/kernels/" in k.source_path:
            continue  # hand-written templates (dequant) have their own tests
        # Draw for every kernel, checked or not: Hypothesis needs the same draws when it replays.
        shapes = [(tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), label="lead")),
                   data.draw(st.integers(1, 300), label="N"),  # kernels take N at launch: any row length
                   data.draw(st.integers(0, 2**16), label="seed")) for _ in range(2)]
        if k.name in _CHECKED:
            continue
        mod = ops.load_module(k.source_path)
        for lead, n, seed in shapes:
            args = kernel_inputs(mod.INPUT_CLASSES, lead, n, seed=seed)
            ref, tri = mod.reference(*args), mod.launch(*args)  # launch: Triton, interpreted on CPU
            STATS["kernel_shapes"] += 1
            for r, t in zip(ref, tri, strict=True):
                assert t.shape == r.shape and t.dtype == r.dtype, (k.name, lead, n)
                torch.testing.assert_close(t, r, **KTOL, msg=lambda m, k=k, lead=lead, n=n: f"{k.name} {lead} N={n}: {m}")
        _CHECKED.add(k.name)  # only after it passed, so a shrinking replay of a failure fails again
        STATS["kernels"] += 1


def _run(spec, data):
    kernels = check_block(spec, atol=ATOL, rtol=RTOL)
    STATS["blocks"] += 1
    _check_kernels(kernels, data)


@pytest.mark.interpreter
@settings(max_examples=25, **FUZZ)
@given(spec=block_specs(), data=st.data())
def test_random_blocks_equal_eager_and_kernels_match_references(spec, data):
    _run(spec, data)


@pytest.mark.slow
@pytest.mark.interpreter
@settings(max_examples=200, **FUZZ)
@given(spec=block_specs(), data=st.data())
def test_random_blocks_many(spec, data):
    _run(spec, data)


@settings(max_examples=4, **FUZZ)
@given(spec=block_specs(), lengths=st.lists(st.sampled_from((9, 10, 13, 16)), min_size=2, max_size=3))
def test_random_blocks_dynamic_lengths_in_one_bucket(spec, lengths):
    """dynamic=True: symbolic sequence lengths reach codegen; every length in the bucket equals eager."""
    from blocks import build

    import effcompile as ec

    model, _ = build(spec)
    torch._dynamo.reset()
    fast = ec.effcompile(model, cache=False, dynamic=True)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for n in lengths:
            x = torch.randn(spec.batch, n, spec.hidden, generator=g)
            torch.testing.assert_close(fast(x), model(x), atol=ATOL, rtol=RTOL, msg=lambda m, n=n: f"{spec} n={n}: {m}")
    report = ec.explain(fast)
    assert len(report.graphs) == 1 and report.graphs[0].recompiles == [], str(report)


_INTERP_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {fuzz_dir!r})
    from hypothesis import given, settings
    from blocks import block_specs, check_block
    from test_fuzz_blocks import FUZZ
    seen = {{"blocks": 0, "paths": set()}}

    @settings(max_examples={n}, **FUZZ)
    @given(spec=block_specs())
    def run(spec):
        kernels = check_block(spec, atol=1e-4, rtol=1e-4)
        seen["blocks"] += 1
        from effcompile.codegen import ops
        seen["paths"] |= {{p for k in kernels for p, c in ops.PATH_COUNTS[k.name].items() if c}}

    run()
    print(json.dumps({{"blocks": seen["blocks"], "paths": sorted(seen["paths"])}}))
""")


@pytest.mark.interpreter
def test_random_blocks_through_triton_interpreter():
    """A few examples with TRITON_INTERPRET=1 set before import (fresh process): the Triton kernels run.

    Tolerance 1e-4: the kernels' erf/exp/rsqrt and reduction order differ from ATen by ulps, and two
    layers with post-norms amplify that (tests/compiler/test_interpreter_e2e.py allows 2e-4).
    """
    fuzz_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": fuzz_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT.format(fuzz_dir=fuzz_dir, n=2)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["blocks"] >= 2 and result["paths"] == ["triton"], result
