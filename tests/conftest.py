"""Test-wide setup: IR checks on, a private cache dir, `gpu` tests skipped without CUDA, shared models."""

import os
import tempfile

import pytest
import torch

# Every pass in the suite runs with IR invariant checks (as CI does), and never touches ~/.cache.
os.environ.setdefault("EFFCOMPILE_CHECKS", "1")
if "EFFCOMPILE_CACHE_DIR" not in os.environ or os.environ.get("_EFFCOMPILE_TEST_CACHE"):
    # Our own temporary dir, one per pytest-xdist worker too (workers inherit the controller's environment,
    # and tests that list or clear the cache must not see another worker's entries); a dir the user set is kept.
    os.environ["EFFCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(
        prefix=f"effcompile-test-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
    os.environ["_EFFCOMPILE_TEST_CACHE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers share the cores: torch's default of one intra-op thread per core in every worker
# oversubscribes them. The H200 lane (16 workers, 16 cores, session 27) spent ~40 s in each int4 test whose
# kernel and int8 twin took ~1 s, in CPU-side setup as far as its timings show. Tests that exercise thread
# splits set their own counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the real MiniLM-L6 weights."""
    from effcompile.testing import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def minilm_batch(minilm):
    _, tok = minilm
    texts = ["The quick brown fox jumps over the lazy dog.", "effcompile fuses kernels.", "Short."]
    return dict(tok(texts, padding=True, return_tensors="pt"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty dynamo caches: many tests compile the same HF forward, and dynamo
    stops compiling a code object after recompile_limit entries (tests/compiler covers that case)."""
    torch._dynamo.reset()
    yield
