"""Compile a kernel launch ahead of time for a named GPU (no GPU needed) and read its SASS hot loop.

The launchers are called on CPU tensors as if they ran on a GPU (``record_launches``): each launch is recorded
instead of run, then triton compiles that exact call (argument dtypes, constexprs, the JIT's 16-byte
specializations, warps, stages) for a target with its bundled ptxas; nvdisasm turns the cubin into SASS.
Used by the compile tests and benchmarks/sass_stats.py, which judges kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from effcompile.codegen import ops as cg_ops

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int8: "*i8",
        torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
        torch.float8_e4m3fn: "*fp8e4nv"}


@dataclass
class Launch:
    kernel: object  # a triton JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def record_launches():
    """Within the block, kernel launchers record a Launch per call (into the yielded list) instead of running."""
    seen: list[Launch] = []
    gpu_variant = cg_ops.jit_variant  # a kernel decorated under TRITON_INTERPRET, rebuilt for the GPU

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(Launch(self.kernel, args, kw, tuple(grid)))

    with mock.patch.object(cg_ops, "interpreting", lambda device: False), \
            mock.patch.object(cg_ops, "jit_variant", lambda kernel, interpret: _Recorder(gpu_variant(kernel, False))):
        yield seen


def compile_launch(launch: Launch, cap: int = 90):
    """triton's CompiledKernel for this launch on an sm_<cap> GPU (asm holds "ptx" and "cubin")."""
    kernel, args, kw = launch.kernel, launch.args, launch.kwargs
    params = kernel.arg_names
    const_names = {p.name for p in kernel.params if p.is_constexpr}
    values = dict(zip(params, args, strict=False)) | {k: v for k, v in kw.items() if k in params}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(params):
        v = values[name]
        if name in const_names:
            sig[name], consts[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name], aligned = _PTR[v.dtype], v.data_ptr() % 16 == 0
        else:
            sig[name], aligned = ("i64" if abs(int(v)) >= 2**31 else "i32"), int(v) % 16 == 0
        if aligned:  # what the JIT launcher specializes on: 16-byte-aligned pointers, ints divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {k: kw[k] for k in ("num_warps", "num_stages", "launch_pdl", "enable_fp_fusion") if k in kw}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", cap, 32), options=opts)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run_on_cubin(compiled, *cmd: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([*cmd, f.name], capture_output=True, text=True, check=True).stdout


def sass(compiled) -> str:
    """The cubin's SASS, as nvdisasm prints it."""
    return _run_on_cubin(compiled, _tool("nvdisasm"), "-c")


def registers(compiled) -> int:
    """Registers per thread, as cuobjdump reports the cubin's resource usage."""
    usage = _run_on_cubin(compiled, _tool("cuobjdump"), "-res-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1))


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(\.L_x_\d+)")
_GUARD = re.compile(r"^@!?U?P[T\d]+\s+")
# Bytes per thread a global load moves (LDG: to registers; LDGSTS: cp.async, global to shared memory).
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # else 32 bits


def load_width(opcode: str) -> int:
    """Bytes per thread of a global load opcode (LDG to registers, LDGSTS cp.async to shared); 0 if not one."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return 0
    return next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 4)


@dataclass
class Loop:
    """One innermost loop of a kernel's SASS (a backward branch): its instructions by opcode."""

    instructions: int
    opcodes: Counter = field(default_factory=Counter)
    load_bytes: int = 0  # global bytes one thread's loads request per iteration (masks ignored)
    loads: Counter = field(default_factory=Counter)  # load opcodes with their width, e.g. LDG.E.U16
    # Instructions that a predicated forward branch inside the loop jumps over (an if's body, e.g. a reload
    # that runs once every few iterations): instructions - skippable is the path an iteration without it takes.
    skippable: int = 0


def loops(sass_text: str) -> list[Loop]:
    """Every loop closed by a backward branch, innermost first in address order."""
    instrs, guarded, labels = [], [], {}
    for line in sass_text.splitlines():
        if m := _INSTR.search(line):
            instrs.append(_GUARD.sub("", m.group(2)))
            guarded.append(bool(_GUARD.match(m.group(2))))
        elif m := _LABEL.match(line.strip()):
            labels[m.group(1)] = len(instrs)
    found = []
    for end, text in enumerate(instrs):
        m = _BRANCH.search(text)
        start = labels.get(m.group(1)) if m else None
        if start is None or start > end or start == end:
            continue
        body = instrs[start:end + 1]
        loop = Loop(len(body), Counter(t.split()[0] for t in body))
        for t in body:
            op = t.split()[0]
            if width := load_width(op):
                loop.load_bytes += width
                loop.loads[op] += 1
        skipped = set()
        for i in range(start, end):
            target = labels.get(b.group(1)) if guarded[i] and (b := _BRANCH.search(instrs[i])) else None
            if target is not None and i < target <= end:
                skipped.update(range(i + 1, target))
        loop.skippable = len(skipped)
        found.append(loop)
    return found
