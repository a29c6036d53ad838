"""The compiled-graph cache seen from effcompile(): warm starts, key sensitivity, corrupt entries, buckets."""

import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch

import effcompile as ec
from effcompile.compiler.pass_manager import PassConfig, PassResult, register_pass
from effcompile.testing import tiny_hf

_SCRIPT = textwrap.dedent("""
    import torch, effcompile as ec
    import effcompile.codegen.lower as lower_mod
    from effcompile.testing import tiny_hf
    if {forbid_codegen}:
        def no_codegen(*a, **k):
            raise AssertionError("warm start must not run codegen")
        lower_mod.lower = no_codegen
    model = tiny_hf("llama", layers=2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    fast = ec.effcompile(model, use_triton=False)  # kernels even on CPU: their reference path
    with torch.no_grad():
        diff = (fast(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    g = ec.explain(fast).graphs[0]
    print(g.cache, "|", g.key_digest, "|", len(g.kernels), "|", diff)
""")


def _run(cache_dir, forbid_codegen=False):
    env = {**os.environ, "EFFCOMPILE_CACHE_DIR": str(cache_dir)}
    r = subprocess.run([sys.executable, "-c", _SCRIPT.format(forbid_codegen=forbid_codegen)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [s.strip() for s in r.stdout.strip().splitlines()[-1].split("|")]


def test_fresh_process_loads_from_disk_without_codegen(tmp_path):
    cold = _run(tmp_path)
    warm = _run(tmp_path, forbid_codegen=True)
    assert cold[0] == "miss" and warm[0] == "disk hit"
    assert cold[1] == warm[1] and cold[2] == warm[2] != "0"
    assert float(warm[3]) < 1e-5


@dataclass(frozen=True)
class _Scale(PassConfig):
    factor: float = 1.0


@register_pass(_Scale, phase="semantic")
def _scale(gm, cfg, ctx):
    return PassResult(modified=False)


def _compile(model, ids, **kw):
    fast = ec.effcompile(model, **kw)
    with torch.no_grad():
        out = fast(input_ids=ids).logits
    return out, ec.explain(fast).graphs[0]


def test_key_changes_with_pass_config_and_opt_level(tmp_path):
    model, ids = tiny_hf("gpt2", layers=1), torch.randint(0, 128, (1, 5))
    _, a = _compile(model, ids, cache_dir=tmp_path, passes=[_Scale(1.0)])
    _, a2 = _compile(model, ids, cache_dir=tmp_path, passes=[_Scale(1.0)])
    _, b = _compile(model, ids, cache_dir=tmp_path, passes=[_Scale(2.0)])
    assert a.cache == "miss" and a2.cache == "memory hit" and a2.key_digest == a.key_digest
    assert b.cache == "miss" and b.key_digest != a.key_digest


def test_corrupt_entry_is_a_miss_with_a_warning(tmp_path):
    model, ids = tiny_hf("gpt2", layers=1), torch.randint(0, 128, (1, 5))
    from effcompile.compiler import backend

    ref, first = _compile(model, ids, cache_dir=tmp_path)
    entry = next(p for p in tmp_path.glob("*/*") if p.name == first.key_digest)
    (entry / "meta.json").write_text("{ not json")
    backend._STORES.clear()  # drop the in-memory layer: the next compile must read the disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, second = _compile(model, ids, cache_dir=tmp_path)
    assert second.cache == "miss"
    assert any("meta.json" in str(w.message) for w in caught)
    torch.testing.assert_close(out, ref)


def test_lengths_inside_a_bucket_do_not_recompile(tmp_path):
    model = tiny_hf("llama", layers=1)
    fast = ec.effcompile(model, dynamic=True, cache_dir=tmp_path)
    with torch.no_grad():
        for n in (9, 10, 13, 16):  # all in bucket 9-16
            ids = torch.randint(0, 128, (1, n))
            torch.testing.assert_close(fast(input_ids=ids).logits, model(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)
        graph = ec.explain(fast).graphs[0]
        assert len(graph.buckets) == 1 and graph.recompiles == [], str(ec.explain(fast))
        fast(input_ids=torch.randint(0, 128, (1, 40)))  # bucket 33-64: one more variant
    assert len(graph.buckets) == 2 and len(graph.recompiles) == 1 and "new shape bucket" in graph.recompiles[0]
    assert len(ec.explain(fast).graphs) == 1  # dynamo did not recompile either


def test_cache_off_writes_nothing(tmp_path):
    model, ids = tiny_hf("gpt2", layers=1), torch.randint(0, 128, (1, 5))
    _, g = _compile(model, ids, cache_dir=tmp_path / "c", cache=False)
    assert g.cache == "off" and not (tmp_path / "c").exists()


def test_unsafe_cache_dir_is_refused_but_compilation_goes_on(tmp_path):
    unsafe = tmp_path / "shared"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    model, ids = tiny_hf("gpt2", layers=1), torch.randint(0, 128, (1, 5))
    with pytest.warns(RuntimeWarning, match="disk cache disabled"):
        out, g = _compile(model, ids, cache_dir=unsafe)
    assert g.cache == "off" and "world-writable" in g.cache_note
    assert list(unsafe.iterdir()) == []
    torch.testing.assert_close(out, model(input_ids=ids).logits)


def test_codegen_failure_is_a_visible_fallback(monkeypatch):
    import effcompile.codegen.lower as lower_mod

    def broken(*a, **k):
        raise RuntimeError("simulated codegen bug")

    monkeypatch.setattr(lower_mod, "lower", broken)
    model, ids = tiny_hf("gpt2", layers=1), torch.randint(0, 128, (1, 5))
    out, g = _compile(model, ids, cache=False)
    torch.testing.assert_close(out, model(input_ids=ids).logits)
    assert g.kernels == [] and g.fallbacks[0][0] == "whole graph" and "simulated codegen bug" in g.fallbacks[0][1]
