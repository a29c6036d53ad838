"""Build and load codegen's small CPU kernels in C: compiled with the system C compiler into the cache directory.

A kernel module (cpu_int4_gemv.py, cpu_float_gemv.py) keeps its C source beside it and calls ``load`` once per
process. The library's name hashes the source, the compiler and its version, the flags and this CPU (the code is
built with -march=native: a library built on another CPU, say in a shared home directory, must not load), so a
cached library is reused only where it was built for. It is written atomically and loaded only from the private
cache directory (runtime.cache.ensure_private_dir), and the module's ``check`` runs it against the reference
before anything uses it; one that fails to load or to agree is built again once, then refused with the reason.
OpenMP comes from the libgomp torch already loaded (same soname), so the kernels share torch's thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc / clang)")
    return cc


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(cc: str, source: Path, out: Path, flags: tuple[str, ...]) -> None:
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = subprocess.run([cc, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True, timeout=120)
    if res.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none


def load(source: Path, symbol: str, argtypes: list, restype, check: Callable[[Callable], None]) -> Callable:
    """The C function ``symbol`` of ``source``, built or taken from the cache, after ``check(fn)`` passed.
    Raises RuntimeError / OSError / subprocess.SubprocessError with the reason when there is none."""
    from effcompile.runtime.cache import default_root, ensure_private_dir  # the cache directory's owner

    cc = compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    directory = ensure_private_dir(default_root() / "native")
    last: Exception | None = None
    # Without OpenMP (e.g. clang lacking libomp) the kernel still runs, on one thread.
    for flags in (FLAGS, tuple(f for f in FLAGS if f != "-fopenmp")):
        key = hashlib.sha256(b"\0".join(s.encode() for s in (source.read_text(), cc, version, *flags, _machine())))
        path = directory / f"{source.stem}-{key.hexdigest()[:20]}.so"
        for attempt in range(2):  # a library that fails to load or to agree is rebuilt once
            try:
                if not path.exists() or attempt:
                    _build(cc, source, path, flags)
                fn = getattr(ctypes.CDLL(str(path)), symbol)  # ctypes releases the GIL during the call
                fn.argtypes, fn.restype = argtypes, restype
                check(fn)
                return fn
            except (OSError, RuntimeError) as e:
                last = e
    raise RuntimeError(str(last))


def threshold_arg(threshold, dtype) -> tuple:
    """(fp32 thresholds or None, stride) for a kernel's ``thr[k * stride]``: one value (stride 0) or one per input.
    Rounded to the activations' dtype first, as the reference compares |x| > threshold in x's dtype."""
    if threshold is None:
        return None, 0
    thr = threshold.to(dtype).float().reshape(-1).contiguous()
    return thr, int(thr.numel() > 1)


@dataclass
class Kernel:
    """One C function of a kernel module, loaded on first use and decided once per process: ``fn``, or ``why`` not."""

    name: str  # "CPU int4 GEMV": how explain() and the log name it
    source: Path
    symbol: str
    argtypes: list
    restype: object
    check: Callable[[Callable], None]
    fallback: str  # what runs without it, for the log
    fn: Callable | None = field(default=None, repr=False)
    why: str | None = None
    decided: bool = False

    def unavailable(self) -> str | None:
        """None when the kernel is built, loaded and agrees with its reference here, else why not."""
        if not self.decided:
            try:
                self.fn, self.why = load(self.source, self.symbol, self.argtypes, self.restype, self.check), None
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                self.fn, self.why = None, f"{self.name} kernel unavailable: {e}"
                log.warning("%s; %s", self.why, self.fallback)
            self.decided = True
        return self.why
