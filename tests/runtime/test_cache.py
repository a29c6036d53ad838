"""Disk cache: round trips, fresh-process hits, corrupt entries are warned misses, atomic concurrent writes."""

import json
import multiprocessing
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python

from effcompile.runtime.cache import (
    FORMAT_VERSION,
    CacheDirError,
    CacheEntry,
    CacheStore,
    CacheWarning,
    default_root,
)
from effcompile.runtime.key import make_key

# Fixed versions: the real ones hash effcompile's source, which other work may edit while tests run.
VERSIONS = {"effcompile": "test", "torch": "t", "triton": "t", "python": "t"}


def _key(name="g"):
    return make_key(graph=name, inputs=[{"kind": "tensor", "shape": [2, "65-128"]}], passes=[], versions=VERSIONS)


def _entry():
    w = torch.arange(12.0).reshape(3, 4)
    return CacheEntry(meta={"graph": {"nodes": []}, "name": "test"}, sources={"kernel_abc.py": "X = 1\n"},
                      tensors={"w": w, "tied": w, "b": torch.ones(2, dtype=torch.bfloat16)})


def _check(e):
    assert e is not None
    assert e.meta["name"] == "test" and e.sources == {"kernel_abc.py": "X = 1\n"}
    assert torch.equal(e.tensors["w"], torch.arange(12.0).reshape(3, 4)) and e.tensors["b"].dtype == torch.bfloat16


def test_roundtrip_memory_and_disk(cache_dir):
    store, k = CacheStore(), _key()
    assert store.get(k) is None and store.stats.misses == 1
    path = store.put(k, _entry())
    assert path.parent.parent == cache_dir and path.name == k.digest and path.parent.name == k.digest[:2]
    _check(store.get(k))
    assert store.stats.memory_hits == 1
    fresh = CacheStore()
    _check(fresh.get(k))
    assert fresh.stats.disk_hits == 1 and fresh.stats.corrupt == 0
    info = fresh.info()
    assert info["entries"] == 1 and info["bytes"] > 0 and info["path"] == str(cache_dir)
    assert [e["digest"] for e in fresh.entries()] == [k.digest]


def test_no_pickle_on_disk(cache_dir):
    path = CacheStore().put(_key(), _entry())
    assert sorted(p.name for p in path.iterdir()) == ["kernel_abc.py", "meta.json", "tensors.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == FORMAT_VERSION and set(meta["files"]) == {"kernel_abc.py", "tensors.safetensors"}


def test_views_and_strided_tensors(cache_dir):
    base = torch.arange(24.0).reshape(4, 6)
    tensors = {"row": base[1], "col": base[:, 2], "t": base.t(), "base": base, "scalar": torch.tensor(3),
               "empty": torch.zeros(0, 3)}
    k = _key()
    CacheStore().put(k, CacheEntry(tensors=tensors))
    got = CacheStore().get(k).tensors
    assert got.keys() == tensors.keys() and all(torch.equal(got[n], tensors[n]) for n in tensors)


def test_fresh_process_disk_hit(cache_dir):
    k = _key()
    CacheStore().put(k, _entry())
    out = run_python(
        "from effcompile.runtime.cache import CacheStore\n"
        "from effcompile.runtime.key import make_key\n"
        f"k = make_key(graph='g', inputs=[{{'kind': 'tensor', 'shape': [2, '65-128']}}], passes=[], "
        f"versions={VERSIONS!r})\n"
        "s = CacheStore(); e = s.get(k)\n"
        "print(k.digest, e.tensors['w'].sum().item(), s.stats.disk_hits)\n")
    assert out.split() == [k.digest, "66.0", "1"]


def _corrupt_truncate(p):
    f = p / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-7])


def _corrupt_garbage_meta(p):
    (p / "meta.json").write_bytes(b"\x00\xffnot json")


def _corrupt_version(p):
    m = json.loads((p / "meta.json").read_text())
    m["format"] = 999
    (p / "meta.json").write_text(json.dumps(m))


def _corrupt_missing_file(p):
    (p / "kernel_abc.py").unlink()


def _corrupt_half_written(p):
    (p / "meta.json").unlink()  # a writer that died before its last file


def _corrupt_flip_byte(p):
    f = p / "kernel_abc.py"
    f.write_text("X = 2\n")


def _corrupt_key_fields(p):
    m = json.loads((p / "meta.json").read_text())
    m["key"]["graph"] = "other"
    (p / "meta.json").write_text(json.dumps(m))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_garbage_meta, _corrupt_version,
                                     _corrupt_missing_file, _corrupt_half_written, _corrupt_flip_byte,
                                     _corrupt_key_fields])
def test_corrupt_entry_is_a_warned_miss(cache_dir, corrupt, caplog):
    k = _key()
    path = CacheStore().put(k, _entry())
    corrupt(path)
    store = CacheStore()
    with pytest.warns(CacheWarning, match=re.escape(str(path))):
        assert store.get(k) is None
    assert store.stats.corrupt == 1 and store.stats.misses == 1
    assert str(path) in caplog.text
    # Writing again replaces the broken entry.
    store.put(k, _entry())
    _check(CacheStore().get(k))


def test_leftover_temp_dir_is_ignored(cache_dir):
    store, k = CacheStore(), _key()
    store.put(k, _entry())
    tmp = cache_dir / ".tmp-deadbeef-x"
    tmp.mkdir()
    (tmp / "tensors.safetensors").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(CacheStore().get(k))
        assert CacheStore().get(_key("other")) is None
    assert len(CacheStore().entries()) == 1
    os.utime(tmp, (0, 0))  # stale: clear() removes it, a recent one may belong to a live writer
    assert CacheStore().clear() == 1
    assert sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".")) == []


def test_clear(cache_dir):
    store = CacheStore()
    for i in range(3):
        store.put(_key(f"g{i}"), _entry())
    assert store.clear() == 3
    assert store.entries() == [] and store.get(_key("g0")) is None


def _blob_files(cache_dir):
    return sorted((cache_dir / "blobs").rglob("*.safetensors"))


def test_large_tensors_are_stored_once_for_all_entries(cache_dir, monkeypatch):
    # A model's prefill and decode graphs hold the same packed weights: one blob per content, named by its SHA-256.
    from effcompile.runtime import cache as C

    monkeypatch.setattr(C, "BLOB_MIN_BYTES", 40)  # w (48 bytes) and the tied copy go to blobs; b (4 bytes) stays
    store = CacheStore()
    for name in ("prefill", "decode"):
        store.put(_key(name), _entry())
    (blob,) = _blob_files(cache_dir)  # w and its tied twin, in both entries: one content
    for name in ("prefill", "decode"):
        _check(CacheStore().get(_key(name)))
        meta = json.loads((store.entry_path(_key(name)) / "meta.json").read_text())
        assert set(meta["shared_tensors"]) == {"w", "tied"} and meta["shared_tensors"]["w"]["sha256"] == blob.stem
    info = CacheStore().info()
    assert info["entries"] == 2 and info["blob_bytes"] == blob.stat().st_size
    assert CacheStore().clear() == 2 and not (cache_dir / "blobs").exists()


def test_a_tensor_already_stored_is_not_serialized_again(cache_dir, monkeypatch):
    # A model's graphs put the same packed weights: the store remembers which blob holds each tensor while it lives
    # unchanged, so the second put does not serialize and hash it again; a changed or vanished blob is written anew.
    from effcompile.runtime import cache as C

    monkeypatch.setattr(C, "BLOB_MIN_BYTES", 40)
    serialized = []
    real = C._tensors_to_bytes
    monkeypatch.setattr(C, "_tensors_to_bytes", lambda ts: serialized.append(sorted(ts)) or real(ts))
    store, entry = CacheStore(), _entry()
    store.put(_key("prefill"), entry)
    assert serialized.count(["t"]) == 1  # w and its tied twin are one tensor: serialized once already
    serialized.clear()
    store.put(_key("decode"), entry)
    assert ["t"] not in serialized
    _check(CacheStore().get(_key("decode")))
    (blob,) = _blob_files(cache_dir)
    blob.unlink()  # gone from disk: written again
    store.put(_key("again"), entry)
    assert ["t"] in serialized and _blob_files(cache_dir) == [blob]
    serialized.clear()
    entry.tensors["w"].add_(1)  # changed in place: a new content, a new blob
    store.put(_key("changed"), entry)
    assert ["t"] in serialized and len(_blob_files(cache_dir)) == 2
    got = CacheStore().get(_key("changed"))
    assert torch.equal(got.tensors["w"], entry.tensors["w"])


def test_a_blob_the_caller_already_holds_is_not_read_again(cache_dir, monkeypatch):
    # A warm start's later graphs name the blobs its first graph read: reuse(sha) hands back the tensor held, so each
    # blob is read and hashed once per compiled model, not once per graph.
    from effcompile.runtime import cache as C

    monkeypatch.setattr(C, "BLOB_MIN_BYTES", 40)
    for name in ("prefill", "decode"):
        CacheStore().put(_key(name), _entry())
    first = CacheStore().get(_key("prefill"))
    (blob,) = _blob_files(cache_dir)
    asked = []
    held = {blob.stem: first.tensors["w"]}

    def reuse(sha):
        asked.append(sha)
        return held.get(sha)

    blob.unlink()  # so a read of it would be a miss
    second = CacheStore().get(_key("decode"), reuse=reuse)
    assert second is not None and second.tensors["w"] is first.tensors["w"] and second.tensors["tied"] is first.tensors["w"]
    assert asked == [blob.stem, blob.stem] and second.digests == {"w": blob.stem, "tied": blob.stem}
    held.clear()  # nothing held: the blob is read, and its absence is found
    with pytest.warns(CacheWarning, match="blob .* missing"):
        assert CacheStore().get(_key("decode"), reuse=reuse) is None


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_bad_blob_is_a_warned_miss_and_written_again(cache_dir, monkeypatch, damage):
    from effcompile.runtime import cache as C

    monkeypatch.setattr(C, "BLOB_MIN_BYTES", 40)
    k = _key()
    CacheStore().put(k, _entry())
    (blob,) = _blob_files(cache_dir)
    if damage == "flip":
        data = bytearray(blob.read_bytes())
        data[-1] ^= 1
        blob.write_bytes(bytes(data))
    else:
        blob.unlink()
    store = CacheStore()
    with pytest.warns(CacheWarning, match="shared tensor (w|tied) .blob"):
        assert store.get(k) is None
    assert _blob_files(cache_dir) == [] and store.stats.corrupt == 1  # removed, so the next put writes it again
    store.put(k, _entry())
    _check(CacheStore().get(k))


def test_dir_created_private(tmp_path, monkeypatch):
    d = tmp_path / "a" / "b"
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(d))
    old = os.umask(0o022)
    try:
        CacheStore().info()
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_world_writable_dir_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(CacheDirError, match=r"world-writable.*chmod 700") as e:
        CacheStore(d).get(_key())
    assert str(d) in str(e.value)


def test_other_owner_refused(tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(d).st_uid + 1)
    with pytest.raises(CacheDirError, match="owned by uid"):
        CacheStore(d).put(_key(), _entry())


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFCOMPILE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "effcompile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_root() == Path.home() / ".cache" / "effcompile"


def test_bad_inputs_rejected(cache_dir):
    with pytest.raises(ValueError):
        CacheStore().put(_key(), CacheEntry(sources={"../evil.py": ""}))
    with pytest.raises(TypeError):
        CacheStore().put(_key(), CacheEntry(meta={"x": object()}))
    assert not [p for p in cache_dir.rglob("*") if p.name.startswith(".tmp")]


RACE_KEY = make_key(graph="race", inputs=[], passes=[], versions={"effcompile": "test"})


def _writer(i, root, q):
    errors = []
    warnings.simplefilter("error")
    for r in range(20):
        try:
            s = CacheStore(root, memory_entries=0)
            s.put(RACE_KEY, CacheEntry({"writer": i, "round": r}, {"k.py": "A = 1\n" * 500},
                                       {"w": torch.arange(5000.0)}))
            e = s.get(RACE_KEY)
            assert e is not None and e.tensors["w"][-1].item() == 4999.0 and e.sources["k.py"].startswith("A = 1")
        except Exception as ex:
            errors.append(repr(ex))
    q.put(errors)


def test_concurrent_writers_same_key(cache_dir):
    # Forked processes (own interpreter state, shared disk) start in milliseconds; fresh interpreters
    # would spend seconds importing torch. The tensors are far below torch's intra-op parallel grain,
    # so no thread pool is touched after the fork.
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(i, str(cache_dir), q)) for i in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [[]] * 4
    store = CacheStore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = store.get(RACE_KEY)
    assert e is not None and len(store.entries()) == 1
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


_PICKLE_USE = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle)\b|"
                         r"\b(pickle|dill|cloudpickle)\.(loads?|dumps?|Unpickler|Pickler)\b|"
                         r"\btorch\.load\s*\(|\bmarshal\.loads?\b", re.M)


def test_no_pickle_or_torch_load_in_package():
    offenders = []
    for py in sorted((REPO / "effcompile").rglob("*.py")):
        for m in _PICKLE_USE.finditer(py.read_text(encoding="utf-8")):
            line = py.read_text(encoding="utf-8").count("\n", 0, m.start()) + 1
            offenders.append(f"{py.relative_to(REPO)}:{line}: {m.group(0).strip()}")
    assert offenders == [], "pickle / torch.load found (cache entries must be JSON + safetensors):\n" + \
        "\n".join(offenders)
