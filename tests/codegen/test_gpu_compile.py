"""Every hand-written Triton kernel compiles for sm_80 / sm_90 (PTX and a cubin), here, without a GPU.

The interpreter runs a kernel's numerics on CPU but accepts code the GPU compiler rejects (dtype mixes in
tl.dot, layouts, fp8 conversions). Triton compiles ahead of time for a named target with its bundled ptxas,
so each kernel variant the launchers can pick is built here too. This checks that it builds, not its speed.
"""

from __future__ import annotations

import pytest
import triton
import triton.language as tl

from effcompile.codegen.kernels import act_quant as aq
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.codegen.kernels import sparse_gemv as S

ASTSource = pytest.importorskip("triton.compiler").ASTSource
GPUTarget = pytest.importorskip("triton.backends.compiler").GPUTarget

_DT = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def _build(fn, ptrs: dict[str, str], consts: dict, cap: int, warps: int = 4, stages: int = 3):
    """Compile ``fn`` for CUDA compute capability ``cap``: pointer types by name, constexprs by name,
    every other argument a 32-bit int (sizes and strides, as the launchers pass them)."""
    sig = {a: ptrs.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], "no cubin"
    return compiled


# (weight format, FMT, code pointer type, scale pointer type): what dequant_matmul.launch passes per format.
_DEQUANT = [("int8", 0, "*i8", None), ("fp8", 0, "*fp8e4nv", None), ("int4", 1, "*u8", None),
            ("mxint8", 2, "*i8", "*i8"), ("mxfp8", 2, "*fp8e4nv", "*i8")]


# e4m3 loads need sm_89+ (supported() sends fp8 formats to the eager path below that): sm_90 only.
_CAPS = [(f, c) for f in _DEQUANT for c in ((90,) if "fp8" in f[0] else (80, 90))]


@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.parametrize("fmt,code,qptr,sptr,cap", [(*f, c) for f, c in _CAPS], ids=[f"{f[0]}-sm{c}" for f, c in _CAPS])
def test_dequant_matmul_compiles(fmt, code, qptr, sptr, cap, shape):
    dt = "bf16" if shape == "decode" else "fp16"
    p = "*" + dt
    decode = shape == "decode"
    consts = dict(FMT=code, G=32 if fmt.startswith("mx") else 128, HAS_BIAS=True, HAS_LORA=fmt == "int4",
                  DOT_DT=_DT[dt], ATOMIC=decode, BLOCK_M=16 if decode else 64, BLOCK_N=64,
                  BLOCK_K=128 if fmt == "int4" else 256 if decode else 64, BLOCK_R=16)
    ptrs = dict(x_ptr=p, q_ptr=qptr, s_ptr=sptr or p, z_ptr=p, b_ptr=p, u_ptr=p, lb_ptr=p,
                out_ptr="*fp32" if decode else p)
    _build(D._matmul_kernel, ptrs, consts, cap)


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_dequant_int4_fp32_and_bf16_small_groups_compile(dt):
    p = "*" + dt
    consts = dict(FMT=1, G=32, HAS_BIAS=False, HAS_LORA=False, DOT_DT=_DT[dt], ATOMIC=True, BLOCK_M=16,
                  BLOCK_N=64, BLOCK_K=32, BLOCK_R=16)
    ptrs = dict(x_ptr=p, q_ptr="*u8", s_ptr=p, z_ptr=p, b_ptr=p, u_ptr=p, lb_ptr=p, out_ptr="*fp32")
    _build(D._matmul_kernel, ptrs, consts, 90, stages=2)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("fmt,code,wptr", [("float", 2, None), ("int8", 0, "*i8"), ("int4", 1, "*u8")])
def test_sparse_gemv_compiles(fmt, code, wptr, dt):
    p = "*" + dt
    consts = dict(FMT=code, G=128 if fmt == "int4" else 1, PER_CHANNEL=fmt == "int8", HAS_BIAS=True,
                  DOT_DT=_DT[dt], ATOMIC=True, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128)
    ptrs = dict(x_ptr=p, t_ptr="*fp32", w_ptr=wptr or p, s_ptr=p, z_ptr=p, b_ptr=p, out_ptr="*fp32")
    _build(S._sparse_kernel, ptrs, consts, 90)


@pytest.mark.parametrize("act,out", [(0, "*i8"), (1, "*fp8e4nv"), (0, "*bf16")])
def test_quantize_rows_compiles(act, out):
    consts = dict(ACT=act, FAKE=out == "*bf16", BF16=out == "*bf16", BLOCK_K=1024)
    _build(aq._quantize_rows_kernel, dict(x_ptr="*bf16", out_ptr=out, s_ptr="*fp32"), consts, 90)


@pytest.mark.parametrize("atomic", [True, False])
def test_w8a8_compiles(atomic):
    consts = dict(HAS_BIAS=True, ATOMIC=atomic, BLOCK_M=16 if atomic else 64, BLOCK_N=64, BLOCK_K=128)
    ptrs = dict(xq_ptr="*i8", sx_ptr="*fp32", q_ptr="*i8", s_ptr="*bf16", b_ptr="*bf16",
                out_ptr="*fp32" if atomic else "*bf16")
    _build(aq._w8a8_kernel, ptrs, consts, 80)
