"""Launch shapes shared by the matmul kernels: split-K for decode so a few output tiles still fill the GPU."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
PROGRAMS_PER_SM = 4  # enough loads in flight per SM to saturate HBM on a bandwidth-bound GEMV
GEMV_MAX_M = 8  # rows of activations up to which the matmul kernels take the decode (split-K) shape


class Config(NamedTuple):
    """One launch shape: output columns and K elements per tile, warps, pipeline stages, K splits (None: auto),
    and how a decode tile is reduced: fma=False pads the rows to a 16-row tl.dot (tensor cores), fma=True
    multiplies and sums in registers over the real rows only (TEAL's and gemlite's batch-1 GEMV style).
    compact (sparse GEMV, one-row fma launches): visit only the kept channels' weight rows, compacted per
    segment, instead of masking the loads of skipped ones (sparse_kernel.py). scale_words (int4 dequant, 16-bit
    tl.dot tiles): read 16-bit scales and zeros as int32 words of two groups, so the pipeliner stages them with
    the weights instead of leaving a synchronous load per chunk (dequant_matmul.py). flat (with compact): compact
    a program's whole K range first, then visit its kept rows in one loop across segments (sparse_kernel.py)."""

    block_n: int
    block_k: int
    warps: int
    stages: int
    splits: int | None = None
    fma: bool = False
    compact: bool = False
    scale_words: bool = False
    flat: bool = False


# Decode (<= 8 rows) tile shapes per weight format, (block_n, block_k, warps, stages).
# fp8 / MX / W8A8 start from the int8 shape (one byte per weight, same loads); not yet measured on a GPU.
# int4: 128 outputs x one 128-group, the fewest SASS instructions per weight byte at 3 CTAs per SM among the
# sweep's tiles (benchmarks/sass_stats.py, session 8); a static choice until a GPU sweep times it.
DECODE = {"int8": (64, 256, 4, 4), "int4": (128, 128, 4, 3), "fp8": (64, 256, 4, 4), "mxint8": (64, 256, 4, 4),
          "mxfp8": (64, 256, 4, 4), "w8a8": (64, 256, 4, 4)}
# The sparse GEMV: int4 packs two outputs per byte, so 128 outputs = 64 contiguous bytes of a needed row.
# int8: 256 outputs (256 contiguous bytes of a row), the H200 sweep's best at 1 and 8 rows; 64 (64 bytes)
# ran at 0.42-0.47x bf16 on the H100 at 50 % sparsity, where no table entry existed.
SPARSE = {"float": (64, 128, 4, 4), "int8": (256, 64, 4, 3), "int4": (128, 128, 4, 4)}
# fp32 dot operands take twice the shared memory per stage: the shapes above asked an H200 for up to
# 490 KB (limit 227 KB), so fp32 gets shorter K tiles and two stages.
FP32 = (64, 64, 4, 2)


def decode_config(fmt: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    return FP32 if dtype == torch.float32 else DECODE[fmt]


def matmul_tiles(m: int, fmt: str, dtype: torch.dtype, config: Config | None = None):
    """(block_m, block_n, block_k, warps, stages, splits or None) for an m-row matmul: ``config`` when given
    (M padded to a power of two >= 16, or just to a power of two for an fma decode config), else decode (M
    padded to one 16-row dot tile, long K chunks, split over programs) up to GEMV_MAX_M rows, else prefill
    tiles (one split). ``dtype``: the dot operands' dtype."""
    if config is not None:
        splits = config.splits if config.splits is not None or m <= GEMV_MAX_M else 1
        return block_m(m, config), *config[:4], splits
    if m <= GEMV_MAX_M:
        return 16, *decode_config(fmt, dtype), None
    return (64 if m >= 64 else 32), 64, 64, 4, 3, 1


def compacts(m: int, config: Config | None) -> bool:
    """Whether a sparse GEMV launch visits only the kept channels: a compact fma config, and one row."""
    return uses_fma(m, config) and bool(config.compact) and m == 1


def uses_fma(m: int, config: Config | None) -> bool:
    """Whether this launch reduces in registers: an fma config, and few enough rows (prefill always dots)."""
    return config is not None and bool(config.fma) and m <= GEMV_MAX_M


def block_m(m: int, config: Config | None) -> int:
    """BLOCK_M: the rows padded to a power of two for an fma launch, else to at least one 16-row dot tile."""
    if uses_fma(m, config):
        return triton.next_power_of_2(m)
    return max(16, triton.next_power_of_2(min(m, 64)))


def sparse_config(fmt: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    return FP32 if dtype == torch.float32 else SPARSE[fmt]


# ---------------------------------------------------------------------------------------------
# Measured launch shapes per GPU: benchmarks/kernels.py --sweep --tuning-out writes a table, either
# committed here (tuning/<device name>.json) or named by $EFFCOMPILE_KERNEL_TUNING. fp16/bf16 only.
# ---------------------------------------------------------------------------------------------

TUNING_ENV = "EFFCOMPILE_KERNEL_TUNING"
TUNING_DIR = Path(__file__).with_name("tuning")
log = logging.getLogger("effcompile.codegen")


def tuning_key(kernel: str, fmt: str, rows: int, shape: tuple[int, int] | None = None) -> str:
    """``dequant/int4/m1``: one entry per kernel, weight format and decode bucket (1 row, or 2-8 rows);
    with ``shape`` (N, K), ``dequant/int4/m1/2048x8192``: that weight shape's own entry, which wins over the
    bucket's (the sweep writes one where a shape's best tile beat the bucket's on that shape)."""
    key = f"{kernel}/{fmt}/m{1 if rows <= 1 else 8}"
    return key if shape is None else f"{key}/{shape[0]}x{shape[1]}"


_KEY = re.compile(r"[a-z0-9]+/[a-z0-9]+/m(1|8)(/[1-9][0-9]*x[1-9][0-9]*)?")


def device_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json"


def read_tables(paths, device_name: str, measured_on: dict[str, str] | None = None) -> dict[str, Config]:
    """Merge tuning tables (later files win); a file for another device or one that does not parse is
    ignored with a warning, never trusted. A table whose entries were measured on another GPU says so in
    "measured_on", except for the keys listed in "measured_here" (re-measured on this GPU since);
    ``measured_on`` (when given) receives that GPU per key it supplied."""
    table: dict[str, Config] = {}
    for path in map(Path, paths):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            if data.get("device") != device_name:
                log.warning("kernel tuning %s is for %r, not this %r: ignored", path, data.get("device"), device_name)
                continue
            configs = {k: Config(*v) for k, v in data["configs"].items()}
            if bad := [k for k in configs if not _KEY.fullmatch(k)]:
                raise ValueError(f"keys {bad} are not kernel/format/m1|m8[/NxK]")
            if not all(isinstance(c.block_n, int) and c.block_n > 0 for c in configs.values()):
                raise ValueError("block sizes must be positive integers")
            if not all(isinstance(f, bool) for c in configs.values() for f in (c.fma, c.compact, c.scale_words, c.flat)):
                raise ValueError("fma, compact, scale_words and flat must be true or false")
            here = data.get("measured_here", [])
            if not (isinstance(here, list) and set(here) <= set(configs)):
                raise ValueError("measured_here must list keys of the table's configs")
            table.update(configs)
            if measured_on is not None:
                source = data.get("measured_on", device_name)
                for k in configs:  # a later table's entry replaces the mark along with the config
                    measured_on.pop(k, None)
                    if source != device_name and k not in here:
                        measured_on[k] = source
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("kernel tuning %s is unreadable (%s): ignored", path, e)
    return table


@functools.cache
def _table(index: int) -> tuple[dict[str, Config], dict[str, str]]:
    """(this GPU's merged table, the GPU each borrowed entry was measured on)."""
    name = torch.cuda.get_device_name(index)
    paths = [TUNING_DIR / device_file_name(name)]
    if os.environ.get(TUNING_ENV):
        paths.append(Path(os.environ[TUNING_ENV]))
    measured_on: dict[str, str] = {}
    return read_tables(paths, name, measured_on), measured_on


# Launch shapes for GPUs whose table has no entry, where a measurement elsewhere (or, said so, a static count)
# beat DECODE / SPARSE.
# dequant/int4/m1: on the H100 every fma tile beat the tl.dot default (128, 128, 4, 3) (session 9). Chunks of
# two groups with register prefetch, (32, 256, 4, 2), won the session-13 sweep at 23.5 / 22.9 us on the 8B MLP
# shapes; the one-group (64, 128, 4, 1, 8), the table's pick from session 9 on, measured 25.4 / 26.6 us in
# session 10.
# sparse/int4/m1: the compacted int4 word path (sparse_kernel.py, session 10), whose inner loop
# issues ~2.6 weight bytes per warp-instruction on sm_90 for (256, 16) against 1.5 for the byte path's best
# measured tile, and 16-row chunks waste less of a group's kept count than 32: a static choice, untimed.
UNTUNED = {"dequant/int4/m1": Config(32, 256, 4, 2, None, True),
           "sparse/int4/m1": Config(256, 16, 4, 1, None, True, compact=True)}


# What tuned() chose on a GPU in this process, per (kernel/format/bucket key, weight shape (N, K) or None):
# (the config or None for the built-in tiles, where it came from). explain() lists it, so a missing table entry
# or a table for another GPU shows as such instead of as a slow kernel.
CHOSEN: dict[tuple[str, tuple[int, int] | None], tuple[Config | None, str]] = {}


def tuned(kernel: str, fmt: str, rows: int, dtype: torch.dtype, device: torch.device,
          shape: tuple[int, int] | None = None) -> Config | None:
    """The measured launch shape for this call on this GPU: its tuning table's entry for this weight shape
    (N, K), else for its decode bucket, else UNTUNED's, if any (recorded in CHOSEN)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key, own_key = tuning_key(kernel, fmt, rows), tuning_key(kernel, fmt, rows, shape) if shape else None
    table, measured_on = _table(index)
    entry = own_key if own_key in table else key if key in table else None
    config = table[entry] if entry is not None else UNTUNED.get(key)
    if (key, shape) not in CHOSEN:  # the source is worded once per shape, not on every launch
        borrowed = f" (measured on {measured_on[entry]}, untimed on this GPU)" if entry in measured_on else ""
        CHOSEN[(key, shape)] = (config, f"tuning table, {entry}{borrowed}" if entry is not None else
                                "launch_plan.UNTUNED (no table entry)" if config is not None else
                                "built-in tiles (no table entry)")
    return config


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


# Split-K output modes of the matmul kernels (their SPLIT constexpr).
SPLIT_NONE, SPLIT_FP32_OUT, SPLIT_FIXUP = 0, 1, 2
# Never evicted: a CUDA graph that captured a launch keeps using its workspace's address. Decode shapes
# (<= GEMV_MAX_M rows, a model's few N) keep this small.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_COUNTS: dict[tuple, torch.Tensor] = {}


def _stream(device: torch.device) -> int:
    """The current stream's handle (0 off CUDA): buffers are shared only by launches that run in order."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def split_workspace(m: int, n: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [m, n] partial sums, int32 [tiles] arrival counts), zero, for a SPLIT_FIXUP launch.

    The splits of a tile add their partial sums into the workspace, then count themselves in; the last to
    arrive stores the sum in the output dtype and zeroes the workspace and its count again. So a split-K
    launch is one kernel, not a memset + the kernel + a cast (3 launches per decode linear, ~2 us each on
    an H100 under CUDA graphs). Kept per device, stream and shape: launches on one stream run one after
    another, so they can share it; another stream gets its own."""
    key = (device, _stream(device), m, n, tiles)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (torch.zeros((m, n), dtype=torch.float32, device=device),
                                 torch.zeros(tiles, dtype=torch.int32, device=device))
    return ws


def arrival_count(device: torch.device) -> torch.Tensor:
    """A zero int32 [1] count for a launch whose programs count themselves in and whose last one resets it
    (the K/V cache write's counter advance); shared per device and stream, like the workspaces above."""
    key = (device, _stream(device))
    if key not in _COUNTS:
        _COUNTS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTS[key]


def dot_dtype(x_dtype: torch.dtype, interpreting: bool):
    """tl.dot input type: the activation dtype, except bf16 under the interpreter (numpy has no bf16, so
    its dot is wrong there); bf16 values are exact in fp32, so only the summation order differs."""
    return tl.float32 if interpreting and x_dtype == torch.bfloat16 else DOT_DTYPES[x_dtype]


# int4 codes q (0..15) become 16-bit floats as OFF + q: q ORed into the low mantissa bits of OFF, a float
# whose ulp is 1 (fp16 1024, bf16 128), so no integer-to-float conversion; the kernels take OFF off each
# value (exact) before dequantizing in registers. fp32 dots and fma tiles use 2**23 the same way.
_INT4_OFFSET = {tl.float16: (0x6400, 1024.0), tl.bfloat16: (0x4300, 128.0)}


def int4_offset(dot_dt) -> tuple[int, float]:
    """(bits, value) of OFF for 16-bit dots of this dtype; (0, 0.0) for fp32 dots, which do not use it."""
    return _INT4_OFFSET.get(dot_dt, (0, 0.0))


# PTX for tl.inline_asm_elementwise(pack=2): two packed int4 bytes ($2, a 16-bit operand, element i in byte i)
# into the 16-bit floats OFF + low nibble ($0: elements 0 and 1) and OFF + high nibble ($1). prmt spreads the
# bytes into the low byte of each 16-bit lane, one lop3 per two values masks a nibble and ORs in OFF's bits,
# one shift brings the high nibbles down: 5 instructions per 4 weights. pack=2, not 4: in the dot-operand
# layout a thread holds pairs of bytes along K, and pack=4 made the compiler gather bytes into words first
# (sm_90 SASS: 376 instructions per loop against 320). tests/codegen/test_int4_asm.py runs this text on an
# emulation of its instructions against the reference decode; the GPU lane checks it for real.
_INT4_ASM = """{
.reg .b32 t0;
cvt.u32.u16 t0, $2;
prmt.b32 t0, t0, 0, 0x4140;
lop3.b32 $0, t0, 0x000F000F, BITS, 0xEA;
shr.u32 t0, t0, 4;
lop3.b32 $1, t0, 0x000F000F, BITS, 0xEA;
}"""


def int4_asm(dot_dt, interpreting: bool) -> str:
    """The int4 decode PTX for 16-bit dots on a GPU, "" (the kernels' plain-Triton decode) otherwise: the
    interpreter cannot run inline assembly, and fp32 dots decode through 2**23 instead."""
    bits = int4_offset(dot_dt)[0]
    if interpreting or not bits:
        return ""
    return _INT4_ASM.replace("BITS", f"0x{bits:04X}{bits:04X}")


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch_lists(ints: int, device: torch.device) -> torch.Tensor:
    """An int32 scratch of at least ``ints`` entries that each program of a launch uses privately (the
    sparse GEMV's lists of kept channels): no contents survive a launch, so launches on one stream share
    it. Never evicted or regrown, as the workspaces above (a CUDA graph keeps the address)."""
    size = triton.next_power_of_2(ints)
    key = (device, _stream(device), size)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(size, dtype=torch.int32, device=device)
    return _SCRATCH[key]
