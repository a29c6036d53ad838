"""Fresh process with TRITON_INTERPRET=1 set before import: warm start from kernel files, Triton path runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cg_util import capture

from effcompile.codegen.lower import lower
from effcompile.compiler.ir import propagate_meta

CHILD = r"""
import json, sys, torch
from triton.runtime.interpreter import InterpretedFunction
from effcompile.codegen import ops
from effcompile.codegen.lower import load_kernels

names = load_kernels(sys.argv[1:])
names2 = load_kernels(sys.argv[1:])  # a second registration is a no-op
mod = ops._LOADED[names[0]]
x = torch.randn(5, 1823, generator=torch.Generator().manual_seed(0))
out = getattr(torch.ops.effcompile, names[0]).default(x, 0)  # mode 0: auto
err = (out - torch.softmax(x * 0.125, -1)).abs().max().item()
print(json.dumps({"names": names, "same": names == names2, "decorated_interp": isinstance(mod._kernel, InterpretedFunction),
                  "counts": {k: dict(v) for k, v in ops.PATH_COUNTS.items()}, "err": err}))
"""


@pytest.mark.interpreter
def test_warm_start_in_fresh_process_with_env_set_before_import(tmp_path):
    gm = capture(lambda x: torch.softmax(x * 0.125, dim=-1), torch.randn(3, 781))
    res = lower(gm, tmp_path / "kernels", use_triton=False)
    propagate_meta(gm)  # the fake impls work: shapes/dtypes flow through the custom op
    assert len(res.kernels) == 1
    env = dict(os.environ, TRITON_INTERPRET="1")
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, res.kernels[0].source_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    name = res.kernels[0].name
    assert report["names"] == [name] and report["same"]
    assert report["decorated_interp"], "env set before import: triton.jit already built an interpreter kernel"
    assert report["counts"] == {name: {"triton": 1}}
    assert report["err"] < 1e-6
