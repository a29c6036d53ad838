"""Write generated kernel modules to disk, import them as custom ops, and pick Triton vs eager per call."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType

import torch
import triton.language as tl

# Which implementation ran, per op name: PATH_COUNTS[name]["triton" | "torch"]. explain() reads it.
PATH_COUNTS: defaultdict[str, Counter] = defaultdict(Counter)
MODE_AUTO, MODE_TRITON, MODE_TORCH = 0, 1, 2

_LOADED: dict[str, ModuleType] = {}
_JIT: dict[tuple[int, bool], object] = {}
_LOCK = threading.Lock()
_TRUE = ("1", "true", "yes", "on", "y")


def env_interpret() -> bool:
    """TRITON_INTERPRET as triton reads it; read at call time, so setting it late still works."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpreting(device: torch.device) -> bool:
    # CPU tensors can only run through the interpreter; CUDA ones unless the user asked for it.
    return device.type != "cuda" or env_interpret()


def use_triton(mode: int, device: torch.device) -> bool:
    if mode == MODE_TRITON:
        return True
    if mode == MODE_TORCH:
        return False
    return device.type == "cuda" or env_interpret()


def jit_variant(kernel, interpret: bool):
    """The kernel compiled for the GPU or wrapped for the interpreter, whatever it was decorated as.

    triton.jit picks JITFunction vs InterpretedFunction when the module is imported (triton 3.6-3.9
    read TRITON_INTERPRET at decoration time), so a module imported before the variable was set would
    otherwise never interpret. We rebuild from the raw function instead of trusting import order.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, InterpretedFunction) == interpret:
        return kernel
    key = (id(kernel), interpret)
    with _LOCK:
        if key not in _JIT:
            _JIT[key] = InterpretedFunction(kernel.fn) if interpret else JITFunction(kernel.fn)
        return _JIT[key]


def kernel_helper(fn):
    """``@triton.jit`` for a function that kernels call, which the interpreter can run too.

    A plain ``@triton.jit`` helper is a JITFunction, and the interpreter refuses to call one ("outside of the
    scope of a kernel") unless TRITON_INTERPRET was set before triton was imported, which kernels must not
    rely on (``jit_variant``). This subclass runs the helper through the interpreter when called; the GPU
    compiler never calls it, it reads its source and inlines it like any JITFunction."""
    return _helper_class()(fn)


@functools.cache
def _helper_class():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    class KernelHelper(JITFunction):
        def __call__(self, *args, **kwargs):
            return InterpretedFunction(self.fn)(*args, **kwargs)

    return KernelHelper


# Programmatic dependent launch (PDL, compute capability 9 and 10): a decode step is ~100 small kernels; between
# two of them the GPU idles while the second launches and its CTAs ramp up (session 13's H100 profile of a
# 1B int4 step: ~160 of 1146 us). Launched with PDL, a kernel's CTAs may start while the kernel before it
# finishes; each first lets the next kernel launch, then waits for its predecessor (wait_for_producers).
# EFFCOMPILE_PDL=0 launches as before (the decode benchmark's ablation).
PDL_ENABLED = os.environ.get("EFFCOMPILE_PDL", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl(device: torch.device) -> bool:
    """Whether effcompile's kernels launch on ``device`` with programmatic dependent launch."""
    if not PDL_ENABLED or device.type != "cuda" or env_interpret():
        return False
    # Hopper and data-center Blackwell (griddepcontrol is sm_90+). Consumer Blackwell (sm_120) is left out:
    # CUDA-graph capture of PDL launches failed there ("invalid resource handle", sglang PR 18596).
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] in (9, 10)


# GPU -> whether its launches used PDL, for explain() (the last launch's answer per device).
PDL_SEEN: dict[str, bool] = {}


def launch_options(device: torch.device) -> dict:
    """The launch arguments every effcompile kernel takes: for PDL its PDL constexpr and triton's launch_pdl, and
    FMA contraction on. The kernels' speed and the numerics their tests and tuning tables measured assume
    contraction, triton's default up to 3.9, which 3.10 turns off (3.9 warns about it). A kernel that must round
    as eager does turns it off itself (cache_write.EXACT_ROUNDING)."""
    on = pdl(device)
    if device.type == "cuda":
        PDL_SEEN[str(device)] = on
    return ({"PDL": True, "launch_pdl": True} if on else {"PDL": False}) | {"enable_fp_fusion": True}


@kernel_helper
def wait_for_producers(PDL: tl.constexpr):
    """A kernel's first statement. With PDL (launch_options): let the next kernel launch, then wait until the
    kernels before this one have finished and their writes are visible. Nothing may come before it that
    reads memory another kernel writes, or writes at all: a buffer this kernel writes may have been freed by a
    kernel still running (torch's allocator reuses memory in stream order). Without PDL it is nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


log = logging.getLogger("effcompile.codegen")
_COPY_WARNED: set[str] = set()


def on_device(t: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """``t`` on ``device``, contiguous. A kernel argument held elsewhere is copied on every call (a sync
    each time, and no CUDA-graph capture): warned once per ``what``, since it means the compiled graph keeps
    that tensor on the wrong device (session 7 found CPU thresholds beside CUDA weights this way)."""
    if t.device != device:
        if what not in _COPY_WARNED:
            _COPY_WARNED.add(what)
            log.warning("effcompile: %s is on %s but its kernel runs on %s: copied on every call", what,
                        t.device, device)
        t = t.to(device)
    return t.contiguous()


def count(name: str, path: str) -> None:
    PATH_COUNTS[name][path] += 1


def no_alias(outs: tuple, inputs: tuple) -> tuple:
    """Custom ops may not return their inputs: a no-op cast in the eager reference would, so copy it."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    safe = []
    for o in outs:  # nor may two returns share storage (e.g. a value and its no-op cast)
        if o.numel() and o.untyped_storage().data_ptr() in ptrs:
            o = o.clone()
        if o.numel():
            ptrs.add(o.untyped_storage().data_ptr())
        safe.append(o)
    return tuple(safe)


def op_exists(name: str) -> bool:
    return hasattr(torch.ops.effcompile, name)


def op_for(name: str):
    return getattr(torch.ops.effcompile, name).default


def write_source(kernel_dir: str | os.PathLike, name: str, source: str) -> Path:
    """Atomically write <kernel_dir>/<name>.py (temp file + rename), skipping an identical file."""
    d = Path(kernel_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.py"
    if path.exists() and path.read_text() == source:
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_module(path: str | os.PathLike) -> ModuleType:
    """Import a generated kernel file by path (tracebacks point at it); the op registers once per name."""
    path = Path(path)
    name = path.stem
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        spec = importlib.util.spec_from_file_location(f"effcompile._generated.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(spec.name, None)
            raise
        _LOADED[name] = module
        return module


def row_layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Where row r of ``t`` (read as [rows, t.shape[-1]], unit stride along the last dim) starts:
    (r // inner) * outer_stride + (r % inner) * inner_stride, as (inner, inner_stride, outer_stride).
    Contiguous: (1, 0, N). A slice of a wider row (what FuseParallelLinears leaves), or a head view of one
    ([B, H, T, D] after a transpose), also fits: its leading dims collapse into at most two evenly strided
    levels. None when they do not, or when a size or stride is symbolic."""
    if t.dim() == 0 or not all(isinstance(v, int) for v in (*t.shape, *t.stride())):
        return None
    if t.is_contiguous():
        return 1, 0, t.shape[-1]
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    levels: list[list[int]] = []  # [size, stride], outermost first, adjacent compatible dims merged
    for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if size == 1:
            continue
        if levels and levels[-1][1] == stride * size:
            levels[-1] = [levels[-1][0] * size, stride]
        else:
            levels.append([size, stride])
    if len(levels) > 2:
        return None
    if len(levels) == 2:
        return levels[1][0], levels[1][1], levels[0][1]
    return 1, 0, levels[0][1] if levels else 0
