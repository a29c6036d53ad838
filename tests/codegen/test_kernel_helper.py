"""ops.kernel_helper: a kernel's @triton.jit helper that the interpreter runs (TRITON_INTERPRET set late) and
the GPU compiler inlines."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from effcompile.codegen import aot, ops

pytestmark = pytest.mark.interpreter


@ops.kernel_helper
def _scaled_and_sum(x_ptr, offs, mask, SCALE: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return x * SCALE, tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _kernel(x_ptr, out_ptr, N, B: tl.constexpr):
    offs = tl.arange(0, B)
    scaled, total = _scaled_and_sum(x_ptr, offs, offs < N, 2.0)
    tl.store(out_ptr + offs, scaled + total, mask=offs < N)


@triton.jit
def _plain_helper(x):
    return x


@triton.jit
def _kernel_with_a_plain_helper(x_ptr, out_ptr, B: tl.constexpr):
    offs = tl.arange(0, B)
    tl.store(out_ptr + offs, _plain_helper(tl.load(x_ptr + offs)))


def _launch(x, out):
    ops.jit_variant(_kernel, ops.interpreting(x.device))[(1,)](x, out, x.numel(), B=16)


def test_the_interpreter_runs_a_helper_when_triton_interpret_was_set_late(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # after `import triton`: a plain @triton.jit helper fails here
    x = torch.arange(11, dtype=torch.float32)
    out = torch.zeros(11)
    _launch(x, out)
    torch.testing.assert_close(out, 2 * x + x.sum())
    with pytest.raises(Exception, match="outside of the scope of a kernel"):  # what kernel_helper is for
        ops.jit_variant(_kernel_with_a_plain_helper, True)[(1,)](torch.zeros(16), torch.zeros(16), B=16)


def test_the_gpu_compiler_inlines_a_helper():
    x, out = torch.zeros(11), torch.zeros(11)
    with aot.record_launches() as seen:
        _launch(x, out)
    ptx = aot.compile_launch(seen[0], 90).asm["ptx"]
    assert "ld.global" in ptx and ".func" not in ptx  # the helper's load, in the kernel itself
