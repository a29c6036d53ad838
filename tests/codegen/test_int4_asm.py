"""The int4 decode PTX (launch_plan._INT4_ASM) against the reference decode, on an emulation of its instructions.

The interpreter cannot run inline assembly, so the GPU kernels' decode is checked here by executing the exact
PTX text the kernels embed, instruction by instruction, for every pair of packed bytes. What this cannot check
is how triton packs the two uint8 elements into the 16-bit operand (element 0 in the low byte, as LLVM lays out
a <2 x i8> vector): the GPU lane's kernel-vs-reference tests check that part.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton.language as tl

from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import ops as qops

M32 = 0xFFFFFFFF


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit in range(32):  # result bit = lut[4 a + 2 b + c], the PTX definition (a: 0xF0, b: 0xCC, c: 0xAA)
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:  # sign-replicate mode: the picked byte's top bit fills the byte
            byte = np.where(byte & 0x80, 0xFF, 0)
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, operands: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the few PTX instructions the decode uses on uint64 arrays holding 32-bit values."""
    regs = dict(operands)

    def val(tok):
        tok = tok.strip()
        return np.uint64(int(tok, 0)) if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", tok) else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [t.strip() for t in args.split(",")]
        if op == "cvt.u32.u16":
            regs[d] = val(src[0]) & 0xFFFF
        elif op == "prmt.b32":
            regs[d] = _prmt(val(src[0]), val(src[1]), int(src[2], 0))
        elif op == "lop3.b32":
            regs[d] = _lop3(val(src[0]) & M32, np.uint64(int(src[1], 0)) if src[1].startswith("0x") else val(src[1]),
                            val(src[2]), int(src[3], 0)) & M32
        elif op == "shr.u32":
            regs[d] = (val(src[0]) & M32) >> np.uint64(int(src[1], 0))
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the new instruction")
    return regs


@pytest.mark.parametrize("dot_dt,torch_dt", [(tl.bfloat16, torch.bfloat16), (tl.float16, torch.float16)], ids=str)
def test_int4_asm_decodes_every_byte_pair_like_the_reference(dot_dt, torch_dt):
    asm = plan.int4_asm(dot_dt, interpreting=False)
    assert asm, "a GPU 16-bit dot must use the assembly decode"
    assert plan.int4_asm(dot_dt, interpreting=True) == "" and plan.int4_asm(tl.float32, interpreting=False) == ""
    pairs = np.arange(1 << 16, dtype=np.uint64)  # byte 0 (element 0) low, byte 1 (element 1) high
    out = run_ptx(asm, {"$2": pairs})
    lo, hi = out["$0"], out["$1"]  # two 16-bit floats each: element 0 in the low half
    halves = np.stack([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], 1).astype(np.int32).astype(np.int16)
    got = torch.from_numpy(halves).view(torch_dt).float() - plan.int4_offset(dot_dt)[1]
    codes = torch.from_numpy(pairs.astype(np.int64))
    b = torch.stack([codes & 0xFF, codes >> 8], 1).to(torch.uint8)  # [65536, 2] packed bytes, as stored
    ref = qops.unpack_int4(b).float()  # [65536, 4]: k = 0, 1 (byte 0's nibbles), 2, 3 (byte 1's)
    want = torch.stack([ref[:, 0], ref[:, 2], ref[:, 1], ref[:, 3]], 1)  # lo of elements 0, 1; hi of 0, 1
    assert torch.equal(got, want)


def test_emulator_catches_a_wrong_mask():
    asm = plan.int4_asm(tl.bfloat16, interpreting=False).replace("0x000F000F", "0x0007000F", 1)
    out = run_ptx(asm, {"$2": np.array([0x0F0F], dtype=np.uint64)})
    assert (int(out["$0"][0]) >> 16) & 0xF != 0xF
