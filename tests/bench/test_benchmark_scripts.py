"""The benchmark scripts GPU sessions run (where a broken script costs device time) work end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_decode_benchmark_runs_a_quantized_and_a_thresholded_config(tmp_path):
    out = tmp_path / "decode.json"
    r = _run("benchmarks/decode.py", "--model", "llama-tiny", "--steps", "1", "--batches", "1,2", "--configs",
             "quantize(weights=int4,group_size=32,smooth=0.5,eora_rank=2);threshold(sparsity=0.5)", "--out", str(out),
             "--cache-len", "64", "--prefill", "--calib-batches", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["launch_shapes"] == []  # GPU tiles only: none on the CPU
    assert data["cache_len"] == 64 and all(row["max_cache_len"] == 64 for row in rows)  # --cache-len reached the cache
    assert data["calibration_batches"] == 1
    assert [row["config"] for row in rows] == ["eager (first)", "quantize(weights=int4,group_size=32,smooth=0.5,eora_rank=2)",
                                              "threshold(sparsity=0.5)", "eager (last)"]
    for row in rows[1:-1]:
        assert "failed" not in row and row["tok_s_b1"] > 0 and row["tok_s_b2"] > 0 and row["vs_eager_b1"] > 0, row
        assert row["kernels"], row  # the rewrite reached a kernel, not just the eager graph
        assert row["calibrated_prefill_s"] > 0 and row["compile_breakdown_s"]["graph_compile"] > 0, row
    # where the thresholds config's compile went: its pass among the timed ones
    assert "threshold_channels" in rows[2]["compile_breakdown_s"]["passes"], rows[2]["compile_breakdown_s"]
    assert all(row["prefill_ms"] > 0 and row["prefill_tokens"] == 2 * 64 for row in rows)  # --prefill: every row


def test_bag_ab_times_each_variant_and_eager(tmp_path):
    out = tmp_path / "ab.json"
    r = _run("benchmarks/bag_ab.py", "threshold(sparsity=0.5)", '{"a": {"BAG_INPUTS": 32}, "b": {"BAG_INPUTS": 4}}',
             "--model", "llama-tiny", "--rounds", "2", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {k: len(v) for k, v in data["tok_s"].items()} == {"a": 2, "b": 2, "eager": 2}
    assert all(v > 0 for v in data["median_vs_eager"].values()) and set(data["median_vs_eager"]) == {"a", "b"}
    bad = _run("benchmarks/bag_ab.py", "threshold(sparsity=0.5)", '{"a": {"NO_SUCH_KNOB": 1}}', timeout=120)
    assert bad.returncode != 0 and "cpu_bag_gemv has no 'NO_SUCH_KNOB'" in bad.stderr


def test_decode_benchmark_refuses_no_calibration_batches(tmp_path):
    r = _run("benchmarks/decode.py", "--model", "llama-tiny", "--calib-batches", "0", "--out", str(tmp_path / "d.json"),
             timeout=120)
    assert r.returncode == 2 and "--calib-batches must be at least 1, got 0" in r.stderr


def test_kernel_benchmark_refuses_without_a_gpu(tmp_path):
    r = _run("benchmarks/kernels.py", "--device", "cpu", "--output", str(tmp_path / "k.json"), timeout=120)
    assert r.returncode == 2 and "needs --device cuda" in r.stderr


def test_sweep_cases_name_their_batch_or_take_every_one(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import kernels
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert kernels.sweep_plan(("dequant/int4/m1", "sparse/float", "dequant/int4/m8"), (1, 8)) == [
        ("dequant/int4", 1), ("sparse/float", 1), ("sparse/float", 8), ("dequant/int4", 8)]
    assert [c for c, _ in kernels.sweep_plan(None, (1,))] == list(kernels.CASES)
    for bad in ("dequant/int5", "dequant/int4/8", "dequant/int4/m8/x"):
        with pytest.raises(ValueError, match="kernel/format"):
            kernels.parse_case(bad)
    r = _run("benchmarks/kernels.py", "--device", "cpu", "--sweep", "--sweep-cases", "sparse/int4/m1,dequant/int4/x",
             "--output", str(tmp_path / "k.json"), timeout=120)
    assert r.returncode == 2 and "'dequant/int4/x' unknown" in r.stderr  # refused before the GPU check


def test_gpu_quick_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_quick.sh")]).returncode == 0


def test_sass_stats_reads_the_hot_loop_of_a_compiled_decode_kernel(tmp_path):
    out = tmp_path / "sass.json"
    r = _run("benchmarks/sass_stats.py", "--config", "dequant:int4:1:128,128,4,3,,0", "--config",
             "sparse:float:1:256,16,4,1,64,1", "--config", "sparse:int4:1:256,16,4,3,,1,1,0,1", "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    int4, sparse, flat = json.loads(out.read_text())["rows"]
    # Config.flat: the chunk loop (not the compaction's, with its barriers), whose group-change scale reload
    # is an if-body the common path skips
    assert flat["config"][-1] is True and flat["barriers"] == 0 and flat["loop_if_body_instructions"] > 100
    per_segment = flat["instructions_per_segment"]  # each chunk more adds the same common path
    assert per_segment["8_chunks"] - per_segment["4_chunks"] == 2 * (per_segment["4_chunks"] - per_segment["2_chunks"])
    assert int4["instructions_per_segment"] is None
    assert int4["block_n"] == 128 and int4["block_k"] == 128 and not int4["fma"] and sparse["fma"]
    for row in (int4, sparse):  # a real K loop: loads, arithmetic, and a ceiling that follows from them
        assert row["loop_instructions"] > 50 and row["load_bytes_per_thread"] > 0, row
        want = row["weight_bytes_per_iteration"] / (row["loop_instructions"] * row["warps"])
        assert abs(row["weight_bytes_per_warp_instruction"] - want) < 1e-3, row
    assert int4["int_to_float"] == 0 and int4["mma"] > 0  # int4 decodes by its bits into tensor-core dots
    assert int4["weight_bytes_per_iteration"] == 128 * 128 // 2


def test_launches_counts_five_fewer_per_layer_with_fused_projections(tmp_path):
    out = tmp_path / "launches.json"
    r = _run("benchmarks/launches.py", "--model", "llama-tiny", "--batches", "1", "--configs",
             "quantize(weights=int8)", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    eager, fused, off = (row["launches_b1"] for row in data["rows"])
    assert [row["config"] for row in data["rows"]][1:] == ["quantize(weights=int8)",
                                                           "quantize(weights=int8) [FuseParallelLinears off]"]
    # per layer: q/k/v -> 1 and gate/up -> 1 linear, q's RoPE into the cache write with k's (FuseRotaryQK needs
    # fused q/k; apart, only k's joins the write, FuseRopeCacheWrite), and silu(gate) * up in the gate/up
    # kernel's epilogue (FuseGatedActivation needs them fused)
    assert fused == off - 5 * data["layers"] and off < eager
    # TRITON_INTERPRET=1: the dequant kernel, as on a GPU
    assert data["rows"][1]["by_op_b1"]["effcompile::dequant_linear"] == 4 * data["layers"]


def test_compare_reads_two_sessions_results_and_refuses_unlike_files(tmp_path):
    res = REPO / "benchmarks" / "results"
    out = tmp_path / "cmp.json"
    r = _run("benchmarks/compare.py", str(res / "decode-h100-llama-1b-2026-11-26-s10.json"),
             str(res / "decode-h100-llama-1b-2026-11-27-s13.json"), "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(x["row"], x["field"]): x for x in json.loads(out.read_text())["rows"]}
    int4 = rows[("quantize(weights=int4,group_size=128)", "tok_s_b1")]  # 623 -> 872 tok/s: faster is better
    assert int4["before"] == 622.97 and int4["after"] == 872.44 and int4["better"] and int4["ratio"] > 1.39
    assert not rows[("quantize(weights=int4,group_size=128)", "compile_and_time_s")]["better"]  # 33.9 -> 46.7 s
    r = _run("benchmarks/compare.py", str(res / "kernels-h100-2026-11-26-s10.json"),
             str(res / "kernels-h200-2026-11-26.json"))
    assert r.returncode == 2 and "devices differ" in r.stderr
    r = _run("benchmarks/compare.py", str(res / "kernels-h100-2026-11-26-s10.json"),
             str(res / "decode-h100-llama-1b-2026-11-27-s13.json"))
    assert r.returncode == 2 and "compare like with like" in r.stderr
