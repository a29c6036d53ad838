"""The compiled-graph cache key: every input that can change what we compile, hashed canonically."""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import math
import platform
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KEY_SCHEMA = 1  # bump when the meaning of a field changes, so old digests can never match
REQUIRED_FIELDS = ("graph", "inputs", "passes")


class UnkeyableValue(TypeError):
    """A value has no stable canonical form, so it cannot be part of a key (the graph is not cached)."""


# ---------------------------------------------------------------------------------------------
# Canonical JSON: the digest is only stable if equal values always serialize to the same bytes.
# ---------------------------------------------------------------------------------------------


def canon(v: Any) -> Any:
    """A JSON-ready, deterministic form of ``v`` (tuples -> lists, nan/inf tagged, sets sorted)."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        # json would write NaN/Infinity (not JSON); tag them so allow_nan=False can stay on.
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, torch.dtype | torch.device | torch.layout | torch.memory_format):
        return str(v)
    if isinstance(v, enum.Enum):
        return f"{type(v).__qualname__}.{v.name}"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_json(v)
    if isinstance(v, list | tuple):
        return [canon(x) for x in v]
    if isinstance(v, set | frozenset):
        return sorted((canon(x) for x in v), key=lambda x: json.dumps(x, sort_keys=True))
    if isinstance(v, dict):
        return {str(k): canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    # repr() of arbitrary objects often embeds a memory address: refusing beats a key that never hits
    # (or, worse, one that hits for a different value).
    raise UnkeyableValue(f"cannot put a {type(v).__qualname__} into a cache key: {v!r:.80}")


def dumps(v: Any) -> str:
    return json.dumps(canon(v), sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest_of(fields: dict) -> str:
    return hashlib.sha256(dumps({"schema": KEY_SCHEMA, **fields}).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """``fields`` is the canonical JSON-ready dict (stored in meta.json); ``digest`` its sha256."""

    fields: dict
    digest: str

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheKey) and other.digest == self.digest


def make_key(**fields: Any) -> CacheKey:
    """Build a key from ``graph`` (fingerprint str), ``inputs`` (list of :func:`input_spec`),
    ``passes`` (list of :func:`pass_identity`) and optionally ``device`` / ``versions`` / extras.
    ``versions`` and ``numerics`` default to this process's values so callers cannot forget them."""
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise TypeError(f"make_key() missing fields: {', '.join(missing)}")
    fields.setdefault("versions", versions())
    fields.setdefault("device", "cpu")
    fields.setdefault("numerics", numerics_flags())
    fields = canon(fields)
    return CacheKey(fields, digest_of(fields))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def bucket_bounds(n: int) -> tuple[int, int]:
    """The power-of-two range holding ``n``: (2^(k-1), 2^k], so 100 -> (65, 128); 0 -> (0, 0)."""
    n = int(n)
    if n <= 1:
        return (n, n)
    hi = 1 << (n - 1).bit_length()
    return (hi // 2 + 1, hi)


def bucket(n: int) -> str:
    lo, hi = bucket_bounds(n)
    return f"{lo}-{hi}"


def stride_class(t: torch.Tensor) -> str:
    """contiguous / channels_last / other: kernels are generated for one memory layout."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "other"


def _size_hint(d) -> int:
    if isinstance(d, torch.SymInt):
        # The helper was renamed across torch releases (hint_int -> optimization_hint).
        from torch.fx.experimental import symbolic_shapes as ss

        hint = getattr(ss, "optimization_hint", None) or getattr(ss, "hint_int", None)
        return int(hint(d)) if hint is not None else int(d.node.hint)
    return int(d)


def input_spec(x: Any, dynamic_dims=()) -> dict:
    """One call argument's part of the key. Dynamic dims (listed, or SymInt in a fake tensor)
    are replaced by their bucket so all lengths in one bucket share an entry."""
    if isinstance(x, torch.Tensor):
        dyn = {int(d) % max(x.dim(), 1) for d in dynamic_dims}
        shape = []
        for i, d in enumerate(x.shape):
            if i in dyn or isinstance(d, torch.SymInt):
                shape.append(bucket(_size_hint(d)))
            else:
                shape.append(int(d))
        return {"kind": "tensor", "shape": shape, "dtype": str(x.dtype), "device": x.device.type,
                "stride": stride_class(x)}
    if isinstance(x, torch.SymInt):
        return {"kind": "symint", "bucket": bucket(_size_hint(x))}
    return {"kind": type(x).__qualname__, "value": canon(x)}


# ---------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _file_sha(path: str, mtime_ns: int, size: int) -> str:
    # mtime/size are part of the lru key so an edited file is re-hashed in a long-lived process.
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_hash(fn: Any) -> str:
    """sha256 of the source file defining ``fn`` (a whole file: helpers it calls change the key too)."""
    fn = inspect.unwrap(fn)
    while isinstance(fn, functools.partial):
        fn = fn.func
    try:
        path = inspect.getsourcefile(fn)
    except TypeError as e:
        raise UnkeyableValue(f"{fn!r} has no Python source file to hash") from e
    if path is None or not Path(path).is_file():
        raise UnkeyableValue(f"source file of {fn!r} not found ({path})")
    st = Path(path).stat()
    return _file_sha(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def config_json(cfg: Any) -> str:
    """Canonical JSON of a (frozen dataclass) pass config, with its type name, sorted keys."""
    if cfg is None:
        return "null"
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        body = {"type": f"{type(cfg).__module__}.{type(cfg).__qualname__}", "fields": dataclasses.asdict(cfg)}
    elif isinstance(cfg, dict):
        body = {"type": "dict", "fields": cfg}
    else:
        raise UnkeyableValue(f"pass config must be a dataclass or dict, got {type(cfg).__qualname__}")
    return dumps(body)


def _signed64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64's finalizer constants, and the golden-ratio constant that gives the second lane other inputs
_MIX1, _MIX2, _LANE2 = _signed64(0xBF58476D1CE4E5B9), _signed64(0x94D049BB133111EB), _signed64(0x9E3779B97F4A7C15)
DEVICE_CHUNK = 1 << 24  # 32-bit words per step of device_checksum: 128 MiB of int64 temporaries


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:  # logical right shift (>> on int64 is arithmetic)
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def device_checksum(t: torch.Tensor) -> bytes:
    """A 128-bit checksum of t's bytes, computed where t lives: two wrapping sums of splitmix64(position, word)
    over its 32-bit words, plus the trailing bytes. A GPU-resident 8B model's weights (16 GB) would otherwise be
    copied to the host and SHA-256'd on every compile of a calibrated graph (an estimated ~15 s each); here one
    flipped bit or two swapped words changes a sum but for a 2**-64 chance per lane. Not cryptographic: it finds
    changed weights (a fine-tuned model), it is no defence against crafted collisions (the cache is local)."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.storage_offset() % 4:  # a view of int32 words must start on a word
        b = b.clone()
    n4 = b.numel() // 4
    words = b[: n4 * 4].view(torch.int32)
    sums = torch.zeros(2, dtype=torch.int64, device=t.device)
    for c in range(0, n4, DEVICE_CHUNK):
        w = words[c:c + DEVICE_CHUNK].to(torch.int64) & 0xFFFFFFFF
        x = (torch.arange(c, c + w.numel(), dtype=torch.int64, device=t.device) << 32) | w
        sums[0] += _mix(x).sum()
        sums[1] += _mix(x ^ _LANE2).sum()
    lanes = [v & ((1 << 64) - 1) for v in sums.tolist()]
    return b"".join(v.to_bytes(8, "little") for v in lanes) + bytes(b[n4 * 4:].tolist())


def contents_version(t: torch.Tensor) -> int:
    """``t._version``, the count of in-place changes memos check; -1 for an inference tensor (a model built under
    torch.inference_mode()), which keeps none: reading ``_version`` there raises, and such a tensor cannot be
    changed in place outside inference mode anyway."""
    return -1 if t.is_inference() else t._version


def tensor_state(t: torch.Tensor) -> tuple[int, int]:
    """What says a tensor still holds what it held: its contents version and its storage (``p.data = other`` keeps
    the version). Not seen: a change through ``p.data.copy_()``, which bumps neither."""
    return contents_version(t), t.data_ptr()


class TensorMemo:
    """A value per tensor, kept while that tensor lives unchanged (the same object in the same tensor_state). Keyed by
    id with a weakref check: tensors compare elementwise, so they cannot be WeakKeyDictionary keys."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}  # id -> (weakref, tensor_state, value)

    def get(self, t: torch.Tensor) -> Any:
        e = self._entries.get(id(t))
        return e[2] if e is not None and e[0]() is t and e[1] == tensor_state(t) else None

    def put(self, t: torch.Tensor, value: Any) -> Any:
        i, memo = id(t), weakref.ref(self)

        def forget(ref):  # the tensor is freed: so is its value (memos can live as long as the process)
            m = memo()
            if m is not None and m._entries.get(i, (None,))[0] is ref:
                del m._entries[i]
        self._entries[i] = (weakref.ref(t, forget), tensor_state(t), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


DIGEST_MIN_BYTES = 1 << 20  # a CPU tensor this large is keyed by its own SHA-256, which a memo can keep


def _tensor_bytes(t: torch.Tensor):
    # The buffer itself, not a bytes copy of it (hashlib reads anything with the buffer protocol).
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor_digest(t: torch.Tensor, memo: TensorMemo | None) -> bytes:
    """``device_checksum`` of an accelerator tensor, SHA-256 of a large CPU one; ``memo`` keeps it while the tensor
    lives unchanged: every graph of a compiled model keys the same weights, and hashing them per graph took 21.6 of a
    66 s llama-1b fp32 warm start (four graphs, 5.4 GB each)."""
    if memo is not None and (hit := memo.get(t)) is not None:
        return hit
    digest = device_checksum(t) if t.device.type != "cpu" else hashlib.sha256(_tensor_bytes(t)).digest()
    return memo.put(t, digest) if memo is not None else digest


def _feed_tensor(h, t: torch.Tensor, memo: TensorMemo | None = None) -> None:
    h.update(f"T|{t.dtype}|{list(t.shape)}|".encode())
    if not t.numel():
        return
    if t.device.type == "meta":
        raise UnkeyableValue(f"a meta tensor {list(t.shape)} has no data to key")
    if t.device.type != "cpu":
        h.update(b"C|" + _tensor_digest(t, memo))  # the bytes never leave the device
    elif t.numel() * t.element_size() >= DIGEST_MIN_BYTES:
        h.update(b"S|" + _tensor_digest(t, memo))
    else:
        h.update(_tensor_bytes(t))


def _feed(h, v: Any, memo: TensorMemo | None = None) -> None:
    if isinstance(v, torch.Tensor):
        _feed_tensor(h, v, memo)
    elif isinstance(v, dict):
        h.update(f"D{len(v)}|".encode())
        for k in sorted(v, key=str):
            h.update(f"K{len(str(k))}|{k}|".encode())
            _feed(h, v[k], memo)
    elif isinstance(v, list | tuple):
        h.update(f"L{len(v)}|".encode())
        for x in v:
            _feed(h, x, memo)
    else:
        s = dumps(v)
        h.update(f"J{len(s)}|{s}".encode())


def calibration_hash(artifacts: dict | None, memo: TensorMemo | None = None) -> str | None:
    """sha256 over sorted names + dtype + shape + bytes of calibration tensors (JSON for the rest); a tensor on
    an accelerator contributes its ``device_checksum`` instead of its bytes, a CPU one of DIGEST_MIN_BYTES or more its
    SHA-256. ``memo`` (the caller's, e.g. per compiled model) keeps those per-tensor digests: a tensor changed in
    place (its _version) or given new storage is hashed again."""
    if artifacts is None:
        return None
    h = hashlib.sha256()
    _feed(h, dict(artifacts), memo)
    return h.hexdigest()


def pass_identity(name: str, version: Any, fn: Any, config: Any, calibration: dict | None = None) -> dict:
    return {"name": name, "version": canon(version), "source": source_hash(fn),
            "config": config_json(config), "calibration": calibration_hash(calibration)}


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _effcompile_version() -> str:
    import effcompile

    ver = getattr(effcompile, "__version__", None)
    if ver is None:
        try:
            from importlib.metadata import version

            ver = version("effcompile")
        except Exception:
            ver = "unknown"
    # The version string alone does not move while developing; a hash of our own source does (the
    # stale-hit class of pytorch#174747 comes from exactly such unversioned changes).
    h = hashlib.sha256()
    root = Path(effcompile.__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{ver}+src.{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=1)
def _triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("triton", "pytorch-triton", "triton-xpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "none"


def versions() -> dict:
    return {"effcompile": _effcompile_version(), "torch": torch.__version__, "triton": _triton_version(),
            "python": platform.python_version()}


def numerics_flags() -> dict:
    """Global switches that change results of the same graph (TF32, reduced-precision reductions)."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "fp16_reduced_reduction": bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "bf16_reduced_reduction": bool(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
    }


def device_capability(device: Any) -> str:
    """``cuda:sm90``-style for CUDA (kernels are tuned per architecture), else the device type."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"cuda:sm{major}{minor}"
    return dev.type


# ---------------------------------------------------------------------------------------------
# Explaining misses
# ---------------------------------------------------------------------------------------------


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(sub)
            else:
                _diff(a[k], b[k], sub, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(path or "<root>")


def diff(key_a: CacheKey | dict, key_b: CacheKey | dict) -> list[str]:
    """Dotted paths of the fields that differ, e.g. ``["inputs[0].shape[1]", "versions.torch"]``."""
    fa = key_a.fields if isinstance(key_a, CacheKey) else canon(key_a)
    fb = key_b.fields if isinstance(key_b, CacheKey) else canon(key_b)
    out: list[str] = []
    _diff(fa, fb, "", out)
    return out
