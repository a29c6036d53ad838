"""Cache-key sensitivity: every field changes the digest, bucket-mates share it, digests are stable."""

import dataclasses
import importlib.util
import json

import pytest
import torch
from conftest import run_python

from effcompile.runtime import key as K


@dataclasses.dataclass(frozen=True)
class Cfg:
    sparsity: float = 0.5
    targets: tuple = ("q", "k")


def _pass_fn(gm, cfg, ctx):
    return gm


def _key(x=None, dyn=(1,), cfg=Cfg(), calib=None, fn=_pass_fn, version=1, **over):
    x = torch.randn(2, 100, 8) if x is None else x
    fields = dict(graph="g" * 32, inputs=[K.input_spec(x, dynamic_dims=dyn), K.input_spec(3)],
                  passes=[K.pass_identity("threshold", version, fn, cfg, calib or {"t": torch.ones(4)})],
                  device=K.device_capability(x.device))
    fields.update(over)
    return K.make_key(**fields)


def test_bucket():
    assert K.bucket(100) == "65-128"
    assert K.bucket(128) == "65-128" and K.bucket(129) == "129-256"
    assert [K.bucket(n) for n in (0, 1, 2, 3, 4, 5)] == ["0-0", "1-1", "2-2", "3-4", "3-4", "5-8"]


def test_same_bucket_same_key():
    base = _key()
    for seq in (65, 90, 128):
        assert _key(torch.randn(2, seq, 8)).digest == base.digest
    assert _key(torch.randn(2, 129, 8)).digest != base.digest
    assert _key(torch.randn(2, 100, 8), dyn=()).digest != base.digest  # static dims are exact


@pytest.mark.parametrize("change", [
    "config", "version", "calibration_value", "calibration_dtype", "calibration_name", "dtype", "shape_bucket",
    "static_dim", "stride", "channels_last", "device_input", "device_capability", "graph", "scalar_input",
    "numerics",
])
def test_each_field_changes_key(change):
    base = _key()
    x = torch.randn(2, 100, 8)
    other = {
        "config": lambda: _key(cfg=Cfg(sparsity=0.6)),
        "version": lambda: _key(version=2),
        "calibration_value": lambda: _key(calib={"t": torch.tensor([1.0, 1, 1, 1.0001])}),
        "calibration_dtype": lambda: _key(calib={"t": torch.ones(4, dtype=torch.float64)}),
        "calibration_name": lambda: _key(calib={"u": torch.ones(4)}),
        "dtype": lambda: _key(x.half()),
        "shape_bucket": lambda: _key(torch.randn(2, 300, 8)),
        "static_dim": lambda: _key(torch.randn(3, 100, 8)),
        "stride": lambda: _key(torch.randn(2, 8, 100).transpose(1, 2)),
        "channels_last": lambda: (_key(torch.randn(2, 3, 4, 5), dyn=()),
                                  _key(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), dyn=())),
        "device_input": lambda: _key(torch.empty(2, 100, 8, device="meta"), device="cpu"),
        "device_capability": lambda: _key(device="cuda:sm90"),
        "graph": lambda: _key(graph="h" * 32),
        "scalar_input": lambda: _key(inputs=[K.input_spec(x, (1,)), K.input_spec(4)]),
        "numerics": lambda: _key(numerics={**K.numerics_flags(), "float32_matmul_precision": "high"}),
    }[change]()
    if isinstance(other, tuple):
        base, other = other
    assert other.digest != base.digest
    assert K.diff(base, other), "diff() must name the changed field"


@pytest.mark.parametrize("name", ["effcompile", "torch", "triton", "python"])
def test_each_version_changes_key(name):
    v = K.versions()
    a, b = _key(versions=v), _key(versions={**v, name: v[name] + "x"})
    assert a.digest != b.digest
    assert K.diff(a, b) == [f"versions.{name}"]


def test_pass_source_file_changes_key(tmp_path):
    src = tmp_path / "my_pass.py"

    def load():
        spec = importlib.util.spec_from_file_location("my_pass", src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.run

    src.write_text("def run(gm, cfg, ctx):\n    return gm\n")
    a = _key(fn=load())
    src.write_text("def helper():\n    return 1\n\ndef run(gm, cfg, ctx):\n    return gm\n")
    b = _key(fn=load())
    assert a.digest != b.digest
    assert K.diff(a, b) == ["passes[0].source"]


def test_diff_names_fields():
    a, b = _key(), _key(torch.randn(2, 300, 8).half())
    assert K.diff(a, b) == ["inputs[0].dtype", "inputs[0].shape[1]"]
    assert K.diff(a, a) == []


def test_unkeyable_values_refused():
    with pytest.raises(K.UnkeyableValue):
        K.input_spec(object())
    with pytest.raises(K.UnkeyableValue):
        K.pass_identity("p", 1, _pass_fn, object())
    with pytest.raises(TypeError):
        K.make_key(graph="g", inputs=[])


def test_nan_config_is_stable():
    a = K.config_json(Cfg(sparsity=float("nan")))
    assert a == K.config_json(Cfg(sparsity=float("nan"))) and "nan" in a


CODE = """
import json, torch
from effcompile.runtime import key as K


def stable_key(versions):
    x = torch.randn(2, 100, 8)
    return K.make_key(graph="abc", inputs=[K.input_spec(x, (1,)), K.input_spec(2.5)],
                      passes=[K.pass_identity("p", 3, K.bucket, {"a": (1, 2)}, {"s": torch.arange(6.).reshape(2, 3)})],
                      device=K.device_capability("cpu"), versions=versions)
"""


def test_digest_stable_across_processes():
    # versions.effcompile hashes the package source, which parallel work may edit mid-run: the child
    # reports the versions it saw and we reuse them, so the test checks every other field.
    out = run_python(CODE + "k = stable_key(K.versions())\nprint(k.digest, json.dumps(k.fields['versions']))")
    digest, vers = out.strip().split(" ", 1)
    ns = {}
    exec(CODE, ns)
    assert ns["stable_key"](json.loads(vers)).digest == digest


def test_cpu_tensor_digest_is_the_bytes_digest():
    # The buffer is hashed in place (no bytes copy) but the digest is what it always was: entries written
    # before that change still hit.
    import hashlib

    t = torch.randn(3, 5).to(torch.bfloat16)
    h = hashlib.sha256()
    h.update(b"D1|K1|w|" + f"T|{t.dtype}|{list(t.shape)}|".encode() + t.view(torch.uint8).numpy().tobytes())
    assert K.calibration_hash({"w": t}) == h.hexdigest()
    assert K.calibration_hash({"w": t[:, 1:]}) != K.calibration_hash({"w": t[:, :4]})  # strided views hashed as values


def test_large_tensors_are_keyed_by_their_own_digest_which_a_memo_keeps(monkeypatch):
    # A compiled model's graphs each key the same weights: a large tensor contributes its own SHA-256, which the
    # caller's memo keeps while the tensor lives unchanged, so it is hashed once per compiled model, not per graph.
    import hashlib

    monkeypatch.setattr(K, "DIGEST_MIN_BYTES", 64)
    w, small = torch.randn(4, 8), torch.randn(3)  # 128 bytes: digested; 12 bytes: hashed in line
    h = hashlib.sha256()
    h.update(b"D2|K5|small|" + f"T|{small.dtype}|[3]|".encode() + small.numpy().tobytes())
    h.update(b"K1|w|" + f"T|{w.dtype}|[4, 8]|S|".encode() + hashlib.sha256(w.numpy().tobytes()).digest())
    memo = K.TensorMemo()
    assert K.calibration_hash({"w": w, "small": small}, memo) == h.hexdigest() == K.calibration_hash({"w": w, "small": small})
    assert len(memo) == 1 and memo.get(w) is not None and memo.get(small) is None  # the large one only
    first = K.calibration_hash({"w": w}, memo)
    memo.put(w, b"kept" * 8)  # the memo is what a second call reads
    assert K.calibration_hash({"w": w}, memo) != first
    w.add_(1)  # changed in place: hashed again
    assert K.calibration_hash({"w": w}, memo) == K.calibration_hash({"w": w}) != first


def test_tensor_memo_keeps_a_value_while_its_tensor_lives_unchanged():
    import gc

    memo, a, b = K.TensorMemo(), torch.ones(3), torch.ones(3)
    assert memo.put(a, "A") == "A" and memo.get(a) == "A" and memo.get(b) is None  # by identity, not by value
    a.add_(1)
    assert memo.get(a) is None  # changed in place
    memo.put(a, "A2")
    a.data = torch.zeros(3)
    assert memo.get(a) is None  # new storage, same version
    memo.put(a, "A3")
    del a
    gc.collect()
    assert len(memo) == 0  # freed with its tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_device_checksum_sees_every_change(dtype):
    t = (torch.randn(1031) * 100).to(dtype)  # an odd byte count for uint8: trailing bytes count too
    base = K.device_checksum(t)
    assert base == K.device_checksum(t.clone()) and len(base) == 16 + t.numel() * t.element_size() % 4
    raw = t.view(torch.uint8)
    for pos in (0, 5, raw.numel() - 1):  # a flipped bit at the start, inside, and in the trailing bytes
        flipped = raw.clone()
        flipped[pos] ^= 1
        assert K.device_checksum(flipped.view(dtype)) != base, pos
    words = t.view(torch.uint8)[: raw.numel() // 4 * 4].view(torch.int32).clone()
    words[[3, 7]] = words[[7, 3]]  # two swapped words: a plain sum would not see it
    assert words[3] != words[7] and K.device_checksum(words) != K.device_checksum(
        t.view(torch.uint8)[: raw.numel() // 4 * 4].view(torch.int32))


def test_device_checksum_does_not_depend_on_chunking(monkeypatch):
    t = torch.randn(1000, 3)
    whole = K.device_checksum(t)
    monkeypatch.setattr(K, "DEVICE_CHUNK", 64)  # positions are absolute: chunks only split the sums
    assert K.device_checksum(t) == whole
    assert K.device_checksum(t.reshape(-1)[1:]) != K.device_checksum(t.reshape(-1)[:-1])  # an unaligned view works


def test_meta_tensors_are_unkeyable():
    with pytest.raises(K.UnkeyableValue, match="meta tensor"):
        K.calibration_hash({"w": torch.empty(4, device="meta")})
