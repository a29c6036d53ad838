"""Launch shapes shared by the matmul kernels: split-K for decode so a few output tiles still fill the GPU."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
PROGRAMS_PER_SM = 4  # enough loads in flight per SM to saturate HBM on a bandwidth-bound GEMV


class Config(NamedTuple):
    """One launch shape: output columns and K elements per tile, warps, pipeline stages, K splits (None: auto)."""

    block_n: int
    block_k: int
    warps: int
    stages: int
    splits: int | None = None


# Decode (<= 8 rows) tile shapes per weight format, (block_n, block_k, warps, stages).
DECODE = {"int8": (64, 256, 4, 4), "int4": (64, 256, 4, 4)}
# The sparse GEMV: int4 packs two outputs per byte, so 128 outputs = 64 contiguous bytes of a needed row.
SPARSE = {"float": (64, 128, 4, 4), "int8": (64, 128, 4, 4), "int4": (128, 128, 4, 4)}
# fp32 dot operands take twice the shared memory per stage: the shapes above asked an H200 for up to
# 490 KB (limit 227 KB), so fp32 gets shorter K tiles and two stages.
FP32 = (64, 64, 4, 2)


def decode_config(fmt: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    return FP32 if dtype == torch.float32 else DECODE[fmt]


def sparse_config(fmt: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    return FP32 if dtype == torch.float32 else SPARSE[fmt]


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def k_split(tiles: int, k: int, block_k: int, device: torch.device, force: int | None = None) -> int:
    """Elements of K each program reduces (a multiple of block_k): K / splits, where splits brings the
    program count up to PROGRAMS_PER_SM per SM on a GPU (1 split on CPU / the interpreter unless forced)."""
    blocks = triton.cdiv(k, block_k)
    if force is not None:
        splits = force
    elif device.type == "cuda":
        splits = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device.index or 0), max(tiles, 1))
    else:
        splits = 1
    splits = max(1, min(splits, blocks))
    return triton.cdiv(blocks, splits) * block_k


def dot_dtype(x_dtype: torch.dtype, interpreting: bool):
    """tl.dot input type: the activation dtype, except bf16 under the interpreter (numpy has no bf16, so
    its dot is wrong there); bf16 values are exact in fp32, so only the summation order differs."""
    return tl.float32 if interpreting and x_dtype == torch.bfloat16 else DOT_DTYPES[x_dtype]
