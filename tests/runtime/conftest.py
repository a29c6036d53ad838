"""Shared helpers for runtime tests: repo on sys.path, a private temp cache dir, subprocess runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the package may not be installed (plain `pytest` from a checkout)
    sys.path.insert(0, str(REPO))


def run_python(code: str, **env) -> str:
    """Run ``code`` in a fresh interpreter with the repo importable; return stdout (fails on error)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("EFFCOMPILE_CACHE_DIR", str(d))
    return d
