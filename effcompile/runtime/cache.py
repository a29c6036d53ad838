"""Compiled-graph cache: a memory layer over verified, atomically written on-disk entries."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .key import CacheKey, TensorMemo, digest_of

log = logging.getLogger("effcompile.cache")

# 3: tensors of BLOB_MIN_BYTES or more stored once per content under blobs/; 2: graph tensors record their device
# (1 reloaded CUDA weights on the CPU)
FORMAT_VERSION = 3
META = "meta.json"
TENSORS = "tensors.safetensors"
# <root>/blobs/<sha256[:2]>/<sha256>.safetensors, one tensor each: a model's prefill and decode graphs pack the same
# weights, and each entry stored its own copy (llama-1b int4 on the CPU: ~2.6 GB on disk for 0.7 GB of packed weights).
BLOBS = "blobs"
BLOB_MIN_BYTES = 1 << 20
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_STALE_TMP_S = 3600.0
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, truncated, wrong version) and was treated as a miss."""


class CacheDirError(PermissionError):
    """The cache directory is not private to this user, so its entries cannot be trusted."""


class _Bad(Exception):
    """Internal: why an entry on disk was rejected."""


@dataclass
class CacheEntry:
    """What a compiled graph needs to be rebuilt: user metadata, generated source files, tensors."""

    meta: dict = field(default_factory=dict)  # caller's JSON-able metadata (graph JSON, kernel names ...)
    sources: dict[str, str] = field(default_factory=dict)  # file name -> generated source text
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor (stored as safetensors)
    path: Path | None = None  # where it lives on disk, once stored or loaded
    # name -> SHA-256 of the blob a loaded tensor was read from, checked against its bytes (BLOBS)
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class CacheStats:
    hits: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0


def default_root() -> Path:
    """EFFCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/effcompile, else ~/.cache/effcompile (never /tmp:
    a shared location is how other users get to plant entries)."""
    env = os.environ.get("EFFCOMPILE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "effcompile"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing; refuse one others can write to (see B3: a local
    cache is only as trustworthy as the people who can write into it)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; make sure
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"effcompile cache path {path} is not a directory; "
                            f"set EFFCOMPILE_CACHE_DIR to a private directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheDirError(
            f"effcompile cache directory {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
            f"its entries could have been written by someone else. Fix: set EFFCOMPILE_CACHE_DIR to a "
            f"directory you own (e.g. ~/.cache/effcompile).")
    if st.st_mode & stat.S_IWOTH:
        raise CacheDirError(
            f"effcompile cache directory {path} is world-writable (mode {stat.S_IMODE(st.st_mode):o}); "
            f"anyone could plant entries in it. Fix: chmod 700 {path}, or set EFFCOMPILE_CACHE_DIR to a "
            f"private directory.")
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _nbytes(t) -> int:
    import torch

    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors_to_bytes(tensors: dict) -> bytes:
    import torch
    from safetensors.torch import save

    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cache tensor {name!r} is a {type(t).__qualname__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()  # safetensors refuses tensors sharing storage (tied weights)
        seen.add(ptr)
        out[name] = t
    return save(out)


class CacheStore:
    """``get(key)`` / ``put(key, entry)`` over ``<root>/<digest[:2]>/<digest>/`` entry directories."""

    def __init__(self, root: str | os.PathLike | None = None, memory_entries: int = 64):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.stats = CacheStats()
        self._memory: OrderedDict[str, CacheEntry] = OrderedDict()
        self._memory_entries = memory_entries
        self._lock = threading.Lock()
        self._checked = False
        # tensor -> its blob record: a model's graphs put the same packed weights, and each put serialized and hashed
        # every one again (llama-1b int4, four graphs: 6.4 s of a profiled compile).
        self._stored = TensorMemo()

    # -- paths --------------------------------------------------------------------------------

    def _root(self) -> Path:
        # Checked on every first use rather than at construction so that merely building a store
        # (e.g. for `--help`) touches nothing on disk.
        if not self._checked:
            ensure_private_dir(self.root)
            self._checked = True
        return self.root

    def entry_path(self, key: CacheKey | str) -> Path:
        d = key.digest if isinstance(key, CacheKey) else key
        return self._root() / d[:2] / d

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: CacheKey, reuse: Callable[[str], Any] | None = None) -> CacheEntry | None:
        """The entry stored under ``key``, from memory or disk (checked), else None. ``reuse(sha)``: a tensor the
        caller already holds from blob ``sha`` (read and checked earlier), taken instead of reading the blob again."""
        with self._lock:
            entry = self._memory.get(key.digest)
            if entry is not None:
                self._memory.move_to_end(key.digest)
                self.stats.hits += 1
                self.stats.memory_hits += 1
                return entry
        path = self.entry_path(key)
        if not path.exists():
            with self._lock:
                self.stats.misses += 1
            return None
        try:
            entry = self._read(path, key, reuse)
        except Exception as e:  # any failure to read back is a miss, never a crash
            reason = str(e) if isinstance(e, _Bad) else f"{type(e).__name__}: {e}"
            msg = f"effcompile cache: ignoring entry {path}: {reason}"
            log.warning(msg)
            warnings.warn(msg, CacheWarning, stacklevel=2)
            with self._lock:
                self.stats.misses += 1
                self.stats.corrupt += 1
            return None
        with self._lock:
            self.stats.hits += 1
            self.stats.disk_hits += 1
            self._remember(key.digest, entry)
        return entry

    def _read(self, path: Path, key: CacheKey | None, reuse: Callable[[str], Any] | None = None) -> CacheEntry:
        try:
            raw = (path / META).read_bytes()
        except FileNotFoundError:
            raise _Bad(f"{META} missing (half-written or deleted entry)") from None
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _Bad(f"{META} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise _Bad(f"{META} is not a JSON object")
        if meta.get("format") != FORMAT_VERSION:
            raise _Bad(f"format version {meta.get('format')!r}, this effcompile reads {FORMAT_VERSION}")
        fields, digest = meta.get("key"), meta.get("digest")
        if not isinstance(fields, dict) or digest_of(fields) != digest or digest != path.name:
            raise _Bad("stored key fields do not hash to the entry's digest")
        if key is not None and (digest != key.digest or fields != key.fields):
            raise _Bad("entry holds a different key")
        files = meta.get("files")
        if not isinstance(files, dict):
            raise _Bad(f"{META} has no file list")
        blobs: dict[str, bytes] = {}
        for name, info in files.items():
            if not isinstance(name, str) or not _SOURCE_NAME.match(name) or not isinstance(info, dict):
                raise _Bad(f"bad file record {name!r}")
            try:
                data = (path / name).read_bytes()
            except FileNotFoundError:
                raise _Bad(f"file {name} missing") from None
            if len(data) != info.get("size"):
                raise _Bad(f"file {name} has {len(data)} bytes, expected {info.get('size')} (truncated?)")
            if _sha(data) != info.get("sha256"):
                raise _Bad(f"file {name} content hash mismatch")
            blobs[name] = data
        tensors = {}
        if TENSORS in blobs:
            from safetensors.torch import load

            # Load from the bytes we just verified, not the path, so a concurrent swap cannot slip in.
            tensors = load(blobs.pop(TENSORS))
        shared = meta.get("shared_tensors", {})
        if not isinstance(shared, dict):
            raise _Bad(f"{META} has a bad shared tensor list")
        for name, info in shared.items():
            held = reuse(info["sha256"]) if reuse is not None and isinstance(info, dict) and info.get("sha256") else None
            tensors[name] = held if held is not None else self._read_blob(name, info)  # verified against its sha256
        sources = {}
        for name in meta.get("sources", []):
            if name not in blobs:
                raise _Bad(f"source {name} not in the file list")
            sources[name] = blobs[name].decode("utf-8")
        return CacheEntry(meta=meta.get("user", {}), sources=sources, tensors=tensors, path=path,
                          digests={name: info["sha256"] for name, info in shared.items()})

    def _blob_path(self, sha: str) -> Path:
        return self._root() / BLOBS / sha[:2] / f"{sha}.safetensors"

    def _read_blob(self, name: str, info) -> Any:
        """A shared tensor, verified against the size and SHA-256 its entry recorded. A bad blob is removed, so the
        next put() of any entry that holds it writes it again."""
        from safetensors.torch import load

        sha = info.get("sha256") if isinstance(info, dict) else None
        if not (isinstance(sha, str) and _DIGEST.match(sha)):
            raise _Bad(f"bad shared tensor record {name!r}")
        path = self._blob_path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _Bad(f"shared tensor {name} (blob {sha[:12]}) missing") from None
        if len(data) != info.get("size") or _sha(data) != sha:
            path.unlink(missing_ok=True)
            raise _Bad(f"shared tensor {name} (blob {sha[:12]}) content hash mismatch")
        loaded = load(data)
        if list(loaded) != ["t"]:
            raise _Bad(f"shared tensor {name} (blob {sha[:12]}) holds {sorted(loaded)}, not one tensor")
        return loaded["t"]

    def _put_blob(self, t) -> dict:
        """Store one tensor under its content's SHA-256 unless a blob of that name and size is there (a bad one is
        removed by the reader that finds it); written to a temp file, then renamed into place."""
        seen = self._stored.get(t)
        if seen is not None:
            path = self._blob_path(seen["sha256"])
            if path.is_file() and path.stat().st_size == seen["size"]:
                return dict(seen)  # this tensor, unchanged since it was stored there
        data = _tensors_to_bytes({"t": t})
        sha = _sha(data)
        path = self._blob_path(sha)
        self._stored.put(t, {"sha256": sha, "size": len(data)})
        if not (path.is_file() and path.stat().st_size == len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                _write_file(tmp, data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return {"sha256": sha, "size": len(data)}

    def _remember(self, digest: str, entry: CacheEntry) -> None:
        if self._memory_entries <= 0:
            return
        self._memory[digest] = entry
        self._memory.move_to_end(digest)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    # -- writing ------------------------------------------------------------------------------

    def put(self, key: CacheKey, entry: CacheEntry) -> Path:
        """Write atomically: build the entry in a temp dir inside the root, then rename it into place.
        With concurrent writers of one key the first rename wins and the others discard theirs."""
        root = self._root()
        for name in entry.sources:
            if not _SOURCE_NAME.match(name) or name in (META, TENSORS):
                raise ValueError(f"bad source file name {name!r} (letters, digits, '_.-'; not {META}/{TENSORS})")
        user = json.loads(json.dumps(entry.meta, allow_nan=False))  # fail here, not at read time
        blobs = {name: text.encode("utf-8") for name, text in entry.sources.items()}
        small = {n: t for n, t in entry.tensors.items() if _nbytes(t) < BLOB_MIN_BYTES}
        if small:
            blobs[TENSORS] = _tensors_to_bytes(small)
        shared = {n: self._put_blob(t) for n, t in entry.tensors.items() if n not in small}
        meta = {
            "format": FORMAT_VERSION,
            "digest": key.digest,
            "key": key.fields,
            "files": {n: {"sha256": _sha(b), "size": len(b)} for n, b in blobs.items()},
            "sources": sorted(entry.sources),
            "shared_tensors": shared,
            "user": user,
            "created": time.time(),
        }
        final = self.entry_path(key)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key.digest[:12]}-", dir=root))
        try:
            for name, data in blobs.items():
                _write_file(tmp / name, data)
            # meta.json last: an entry without it is recognisably incomplete.
            _write_file(tmp / META, json.dumps(meta, sort_keys=True, indent=1).encode())
            _fsync_dir(tmp)
            final.parent.mkdir(exist_ok=True)
            self._install(tmp, final, key)
            _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        stored = CacheEntry(meta=user, sources=dict(entry.sources), tensors=dict(entry.tensors), path=final)
        with self._lock:
            self.stats.writes += 1
            self._remember(key.digest, stored)
        return final

    def _install(self, tmp: Path, final: Path, key: CacheKey) -> None:
        for _ in range(5):
            try:
                os.rename(tmp, final)  # atomic; fails if final exists and is non-empty
                return
            except OSError:
                if not final.exists():
                    continue  # someone removed it between our rename and the check; retry
            try:
                self._read(final, key)
                return  # a valid entry is already there: first writer wins
            except Exception:
                pass
            # A broken entry sits in the way: move it aside atomically (only one mover succeeds).
            trash = final.parent.parent / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
            try:
                os.rename(final, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
        raise OSError(f"could not install cache entry {final} after 5 attempts")

    # -- management ---------------------------------------------------------------------------

    def _entry_dirs(self) -> list[Path]:
        root = self._root()
        out = []
        for shard in sorted(root.iterdir()):
            if shard.is_dir() and len(shard.name) == 2 and not shard.name.startswith("."):
                out.extend(p for p in sorted(shard.iterdir()) if p.is_dir() and _DIGEST.match(p.name))
        return out

    def entries(self) -> list[dict]:
        """One summary per entry on disk (meta.json only; content hashes are checked by get())."""
        out = []
        for p in self._entry_dirs():
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            summary: dict[str, Any] = {"digest": p.name, "path": str(p), "bytes": size}
            try:
                meta = json.loads((p / META).read_bytes())
                summary.update(created=meta.get("created"), files=sorted(meta.get("files", {})),
                               format=meta.get("format"), user=meta.get("user", {}),
                               graph=meta.get("key", {}).get("graph"))
            except Exception as e:
                summary["error"] = f"{type(e).__name__}: {e}"
            out.append(summary)
        return out

    def info(self) -> dict:
        ents = self.entries()
        blobs = self._root() / BLOBS
        blob_bytes = sum(f.stat().st_size for f in blobs.rglob("*.safetensors")) if blobs.is_dir() else 0
        return {"path": str(self.root), "entries": len(ents), "bytes": sum(e["bytes"] for e in ents),
                "blob_bytes": blob_bytes, "memory_entries": len(self._memory), "stats": asdict(self.stats)}

    def clear(self) -> int:
        """Remove every entry (and leftover temp dirs); returns the number of entries removed."""
        root = self._root()
        n = 0
        for p in self._entry_dirs():
            trash = root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
            try:
                os.rename(p, trash)  # readers see a clean miss, never a half-deleted entry
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            n += 1
        if (root / BLOBS).is_dir():  # after the entries: none is left to name a blob
            trash = root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
            try:
                os.rename(root / BLOBS, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass
        # Temp dirs of writers that crashed; a recent one may belong to a live writer in another
        # process, and deleting it under them would turn their put() into an error.
        cutoff = time.time() - _STALE_TMP_S
        for p in root.iterdir():
            try:
                stale = p.stat().st_mtime < cutoff
            except OSError:
                continue
            if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and p.is_dir() and stale:
                shutil.rmtree(p, ignore_errors=True)
        with self._lock:
            self._memory.clear()
        return n
