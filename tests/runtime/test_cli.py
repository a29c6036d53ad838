"""`effcompile cache ls|info|clear` against a temporary cache directory."""

import json
import os

import pytest
import torch

from effcompile.cli import main
from effcompile.runtime.cache import CacheEntry, CacheStore
from effcompile.runtime.key import make_key


def _fill(n):
    store = CacheStore()
    for i in range(n):
        store.put(make_key(graph=f"graph{i}", inputs=[], passes=[], versions={}),
                  CacheEntry({"model": "tiny"}, {"k.py": "pass\n"}, {"w": torch.ones(3)}))


def test_ls_info_clear(cache_dir, capsys):
    assert main(["cache", "ls"]) == 0
    assert "empty" in capsys.readouterr().out
    _fill(2)
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert out.count("model=tiny") == 2 and "graph0" in out
    assert main(["cache", "ls", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "entries: 2" in out
    assert main(["cache", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 2
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.strip() == "removed 2 cache entries"
    assert main(["cache", "--cache-dir", str(cache_dir), "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 0


def test_unsafe_dir_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(d))
    assert main(["cache", "ls"]) == 2
    err = capsys.readouterr().err
    assert "world-writable" in err and str(d) in err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["cache"])
