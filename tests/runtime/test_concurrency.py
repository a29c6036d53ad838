"""Threads calling one compiled model, and long runs of calls inside one shape bucket (no recompiles, no growth)."""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

import effcompile as ec
from effcompile.testing import tiny_hf

K_THREADS, ROUNDS = 4, 6
LENGTHS = (9, 10, 11, 12, 13, 14, 15, 16)  # one power-of-two bucket: 9-16


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny ops with 2 OpenMP threads on a loaded 2-core machine stall in spin barriers (measured:
    ~170 ms per eager call vs 0.7 ms with one thread); K Python threads would oversubscribe further."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, n), generator=g) for i, n in enumerate(LENGTHS)]


def _hammer(fast, inputs, refs, rounds: int = ROUNDS) -> list[str]:
    """K threads released together by a barrier, each calling ``fast`` on every input; returns errors."""
    errors: list[str] = []
    barrier = threading.Barrier(K_THREADS)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():  # grad mode is thread-local: each thread sets its own
                for r in range(rounds):
                    i = (t + r) % len(inputs)
                    out = fast(input_ids=inputs[i]).logits
                    if not torch.allclose(out, refs[i], rtol=1e-5, atol=1e-5):
                        errors.append(f"thread {t} round {r}: max diff {(out - refs[i]).abs().max().item():.3e}")
        except Exception as e:  # a crash in a thread must fail the test, not vanish with the thread
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(K_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung (deadlock?)"
    return errors


@pytest.fixture(scope="module")
def llama():
    model = tiny_hf("llama", layers=1)
    inputs = _inputs()
    with torch.no_grad():
        refs = [model(input_ids=x).logits for x in inputs]
    return model, inputs, refs


@pytest.mark.parametrize("warm", [True, False], ids=["after-warmup", "cold-first-call"])
def test_threads_calling_one_compiled_model_get_correct_results(llama, warm):
    """K threads x R calls with different lengths; cold: all threads race into the very first call.

    The first call compiles (dynamo + passes + codegen). effcompile serializes it with a lock, so the
    racing threads wait and then reuse the one compiled graph: no duplicate graph, no extra variant.
    """
    model, inputs, refs = llama
    torch._dynamo.reset()
    fast = ec.effcompile(model, dynamic=True, cache=False)
    if warm:
        with torch.no_grad():
            fast(input_ids=inputs[0])
    errors = _hammer(fast, inputs, refs)
    assert errors == [], errors
    report = ec.explain(fast)
    assert len(report.graphs) == 1, str(report)
    g = report.graphs[0]
    assert g.buckets == ["('9-16',)"] and g.recompiles == [], str(report)
    assert g.calls == K_THREADS * ROUNDS + warm  # calls are counted under the lock: none lost


def test_threads_entering_a_new_bucket_compile_it_once(llama):
    """After warm-up in bucket 9-16, all threads jump to lengths in bucket 17-32 at once."""
    model, _, _ = llama
    torch._dynamo.reset()
    fast = ec.effcompile(model, dynamic=True, cache=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        fast(input_ids=torch.randint(0, 128, (1, 12), generator=g))
        inputs = [torch.randint(0, 128, (1, n), generator=g) for n in (17, 20, 25, 32)]
        refs = [model(input_ids=x).logits for x in inputs]
    errors = _hammer(fast, inputs, refs, rounds=2)
    assert errors == [], errors
    report = ec.explain(fast)
    graph = report.graphs[0]
    assert len(report.graphs) == 1 and graph.buckets == ["('9-16',)", "('17-32',)"], str(report)
    assert len(graph.recompiles) == 1, graph.recompiles  # one variant for the new bucket, not one per thread


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def block():
    """A pure-torch 2-layer block (GQA, Llama RMSNorm, SwiGLU, causal softmax): no transformers caches
    in the measurement, only what effcompile and dynamo keep per call."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
    from blocks import BlockSpec, build

    spec = BlockSpec(hidden=40, heads=4, kv_heads=2, norm="llama_rms", act="swiglu", attn="manual", causal=True,
                     layers=2)
    model, _ = build(spec)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, n, spec.hidden, generator=g) for n in LENGTHS]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
    return model, inputs, refs


def _endurance(block, calls: int) -> dict:
    model, inputs, refs = block
    torch._dynamo.reset()
    fast = ec.effcompile(model, dynamic=True, cache=False)
    warmup = 200  # allocator pools, dynamo's guard caches and lazy imports settle in the first calls
    with torch.no_grad():
        for i in range(warmup // 2):
            fast(inputs[i % len(inputs)])
        # fail_on_recompile: dynamo raises instead of recompiling, so "no recompiles" is enforced, not
        # sampled. Its first use allocates too, so half the warm-up already runs under it.
        with torch.compiler.set_stance("fail_on_recompile"):
            for i in range(warmup // 2):
                fast(inputs[i % len(inputs)])
            gc.collect()
            # pymalloc's live block count: every leaked Python object (a list entry, a report line, a
            # cached frame) is at least one block. Unlike tracemalloc it costs nothing per call.
            blocks0, rss0 = sys.getallocatedblocks(), _rss_bytes()
            for i in range(calls):
                out = fast(inputs[i % len(inputs)])
                if i % 997 == 0:  # spot checks: results stay right all along the run
                    torch.testing.assert_close(out, refs[i % len(inputs)], rtol=1e-5, atol=1e-5)
        gc.collect()
        blocks1, rss1 = sys.getallocatedblocks(), _rss_bytes()
    return {"report": ec.explain(fast), "blocks": blocks1 - blocks0, "rss": rss1 - rss0, "calls": calls,
            "warmup": warmup}


def _check_endurance(r: dict) -> None:
    report = r["report"]
    assert len(report.graphs) == 1, str(report)  # dynamo did not recompile
    g = report.graphs[0]
    assert len(g.buckets) == 1 and g.recompiles == [], str(report)  # nor did effcompile
    assert g.calls == r["calls"] + r["warmup"]
    # One leaked object per call would add >= calls blocks; 300 + calls/4 absorbs interpreter noise
    # (freelists, interned strings, dict resizes), which measured within +-300 blocks per 1000 calls.
    assert r["blocks"] < 300 + r["calls"] // 4, r
    # RSS includes the C allocator's pools; measured growth is < 100 KiB. Leaking each output tensor
    # (1x16x40 fp32, 2.5 KiB) for 10^4 calls would add ~25 MiB.
    assert r["rss"] < 8 * 2**20, r


def test_endurance_inside_one_bucket_short(block):
    _check_endurance(_endurance(block, calls=1000))


@pytest.mark.slow
def test_endurance_inside_one_bucket_10k_calls(block):
    r = _endurance(block, calls=10_000)
    print(f"endurance: {r['calls']} calls, pymalloc blocks {r['blocks']:+d}, RSS {r['rss'] / 2**10:+.0f} KiB")
    _check_endurance(r)
