"""The kernel sweep's choice of tile configs (benchmarks/kernels.py), with its GPU timer replaced by a table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from effcompile.codegen.kernels import launch_plan as plan

REPO = Path(__file__).resolve().parents[2]


def _kernels_script():
    spec = importlib.util.spec_from_file_location("kernels_bench", REPO / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_shape_gets_its_own_entry_only_where_its_best_is_clearly_faster(monkeypatch):
    kb = _kernels_script()
    big, small = plan.Config(64, 128, 4, 1, 8, True), plan.Config(16, 512, 4, 1, 1, True)
    # ms per (shape, config): "big" wins the sum, "small" wins the small shape by far, and on the third shape
    # "small" is ahead by less than the noise margin (SHAPE_GAIN), so that shape keeps the bucket's config.
    ms = {("a", big): 10.0, ("a", small): 20.0, ("b", big): 4.0, ("b", small): 2.0,
          ("c", big): 3.0, ("c", small): 2.9}
    clock = {}

    def run(shape):
        def fn(cfg):
            clock["now"] = (shape, cfg if cfg is None else cfg._replace(splits=big.splits if cfg.block_n == 64
                                                                          else small.splits))
            return torch.ones(3)
        return fn, torch.ones(3)

    monkeypatch.setattr(kb, "_bench", lambda fn: (fn(), ms.get(clock["now"], 99.0))[1])
    runs = [run(s) for s in "abc"]
    timed = kb._time_configs(runs, [big, small])
    assert [r[1] for r in timed] == [big, small] and timed[0][2] == [10.0, 4.0, 3.0]
    own = kb._per_shape(runs, timed, ("a", "b", "c"))
    assert set(own) == {"b"} and own["b"][0].block_n == 16 and own["b"][1:] == (2.0, 4.0)


def test_a_config_that_disagrees_with_the_default_launch_is_dropped(monkeypatch):
    kb = _kernels_script()
    monkeypatch.setattr(kb, "_bench", lambda fn: 1.0)
    good, wrong = plan.Config(64, 128, 4, 1), plan.Config(32, 128, 4, 1)
    runs = [(lambda cfg: torch.ones(4) * (2 if cfg == wrong else 1), torch.ones(4))]
    assert [r[1] for r in kb._time_configs(runs, [good, wrong])] == [good]


def test_an_unknown_sweep_case_is_refused_before_any_gpu_work(capsys):
    kb = _kernels_script()
    try:
        kb.main(["--sweep", "--sweep-cases", "sparse/int4,sparse/int5", "--output", "unused.json"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown case was accepted")
    assert "sparse/int5" in capsys.readouterr().err


@pytest.mark.interpreter
def test_sparse_rows_run_and_match_their_references_at_both_ends():
    # benchmarks/kernels.py's sparse rows on a small shape (CPU tensors: the Triton interpreter): every variant,
    # one to three rows, including the one-row int4 ends (every channel kept, none kept) that separate a launch's
    # fixed cost from its read rate; the bytes counted read shrink with sparsity and are only x and the output
    # at 100 %.
    from effcompile.compiler import ops as qops

    kb = _kernels_script()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(72, 256, generator=gen) / 16
    quant = {(f, g): qops.quantize_weight(w, f, g) for f, g in (("int8", 0), ("int4", 128))}
    for m in (1, 2, 3):
        x = torch.randn(m, 256, generator=gen)
        rows = kb.sparse_variants(x, w, quant, out_bytes=m * 72 * 4)
        assert ("ec-sparse0-int4-g128" in rows and "ec-sparse100-int4-g128" in rows) == (m == 1), sorted(rows)
        # past SKIP_ROWS_MAX (2) rows: x thresholded by torch, then one matmul on the input-major weight
        assert ("thr+mm-sparse50-float" in rows) == (m > 2), sorted(rows)
        assert ("ec-sparse50-int8-gemm" in rows and "ec-sparse50-int4-g128-gemm" in rows) == (m > 2), sorted(rows)
        assert ("ec-sparse50-int4-g128-dot" in rows) == (m <= 2), sorted(rows)  # the 16-row dot tile, 16 K splits
        assert ("ec-sparse0-int4-g128-dot" in rows) == (m == 1), sorted(rows)
        for label, (fn, _read, ref) in rows.items():
            torch.testing.assert_close(fn(), ref, rtol=1e-3, atol=1e-3, msg=label)
        if m == 1:
            ends = rows["ec-sparse100-int4-g128"][1], rows["ec-sparse50-int4-g128"][1], rows["ec-sparse0-int4-g128"][1]
            assert ends[0] == x.numel() * 4 + 72 * 4 < ends[1] < ends[2], ends
