"""`effcompile bench` end to end on tiny models: JSON lines, the Markdown tables, bad input, the sweep's plot."""

import dataclasses
import json

import pytest

from effcompile import cli
from effcompile.bench import harness, report


@dataclasses.dataclass(frozen=True)
class _Small(harness.BenchSettings):
    """The CLI's settings with small quality and decode workloads (what the CLI does is under test)."""

    decode_warmup: int = 1
    prompt_len: int = 8
    lm_window: int = 16
    lm_windows: int = 2
    new_tokens: int = 2
    n_queries: int = 8
    n_docs: int = 16


@pytest.fixture(autouse=True)
def small(monkeypatch):
    monkeypatch.setattr(harness, "BenchSettings", _Small)


def _bench(tmp_path, *args):
    return cli.main(["bench", "--batch", "2", "--seq", "16", "--reps", "2", "--no-inductor", "--no-cache",
                     "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), *args])


def test_bench_writes_jsonl_and_table(tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert _bench(tmp_path, "--model", "bert-tiny", "--passes", "remove_dropout", "--output", str(out)) == 0
    text = capsys.readouterr().out
    assert "| Model | Passes | Base | Optimized | Recovery | Speedup |" in text
    assert "| bert-tiny | `remove_dropout` | top1_agreement 1 | top1_agreement 1 | 100.0 % |" in text
    (rec,) = report.read_jsonl(out)
    assert rec["model"] == "bert-tiny" and rec["passes"]["spec"] == "remove_dropout"
    assert rec["settings"]["batch"] == 2 and rec["inputs"]["input_ids"] == [2, 16]
    assert rec["speed"]["prefill"]["inductor"] == {"skipped": "inductor disabled"}
    report.append_jsonl(out, [rec])  # appends, never overwrites
    assert len(report.read_jsonl(out)) == 2


@pytest.mark.parametrize("args, match", [
    (["--model", "gpt5"], "unknown model 'gpt5'; valid: minilm, stdlib-lm"),
    (["--model", "bert-tiny", "--passes", "quantise"], "unknown pass 'quantise'; valid: .*quantize, .*remove_dropout"),
    (["--model", "bert-tiny", "--passes", "quantize(bits=4)"], "no field 'bits'; fields: weights, group_size"),
    (["--model", "bert-tiny", "--sweep", "quantize(weights=int4,group_size=32)"], "no \\[a,b\\] list"),
    (["--model", "bert-tiny", "--dtype", "fp8"], "BenchSettings.dtype='fp8'"),
])
def test_bad_input_is_an_error_listing_valid_names(tmp_path, capsys, args, match):
    assert _bench(tmp_path, *args) == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_sweep_writes_records_and_pareto_plot(tmp_path, capsys):
    out, plot = tmp_path / "sweep.jsonl", tmp_path / "pareto.png"
    rc = _bench(tmp_path, "--model", "bert-tiny", "--sweep", "quantize(weights=[int8,int4],group_size=[None,32])",
                "--output", str(out), "--plot", str(plot), "--quiet")
    assert rc == 0
    text = capsys.readouterr().out
    recs = report.read_jsonl(out)
    assert [r["passes"]["spec"] for r in recs] == ["none", "quantize(weights=int8,group_size=None)",
                                                   "quantize(weights=int4,group_size=32)"]
    assert "skipped invalid grid point quantize(weights=int8,group_size=32)" in text
    assert f"Pareto plot: {plot}" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    # One shared baseline: every record carries the same eager numbers; dense effcompile is exact.
    assert len({json.dumps(r["speed"]["prefill"]["eager"]) for r in recs}) == 1
    assert recs[0]["quality"]["recovery"] == pytest.approx(1.0, abs=1e-6)
    assert recs[0]["quality"]["details"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert all(r["effcompile"]["fired"].get("quantize", 0) > 0 for r in recs[1:])


def test_gpu_lane_collects_steps_and_records(tmp_path):
    from effcompile.bench import lane

    log, bench = tmp_path / "tests.log", tmp_path / "bench.jsonl"
    log.write_text("3 passed in 1.0s\n")
    report.append_jsonl(bench, [{"model": "minilm"}, {"model": "stdlib-lm"}])
    rc = lane.main(["--results-dir", str(tmp_path), "--name", "dev-x.json", "--step", f"gpu-tests=0:{log}",
                    "--step", "spine=1", "--step", "sweep-stdlib-lm=skip:not cached", "--bench", str(bench),
                    "--spine", str(tmp_path / "missing.json")])
    assert rc == 1  # a failed step fails the lane, after the results are written
    out = json.loads((tmp_path / "dev-x.json").read_text())
    assert out["steps"]["gpu-tests"] == {"rc": 0, "log_tail": "3 passed in 1.0s\n"}
    assert out["steps"]["spine"]["failed"] == "exit status 1"
    assert out["steps"]["sweep-stdlib-lm"] == {"skipped": "not cached"}
    assert "failed" in out["spine"] and [r["model"] for r in out["records"]] == ["minilm", "stdlib-lm"]
    assert {"torch", "triton"} <= set(out["versions"]) and out["date"]
    assert lane.default_name("NVIDIA H100 80GB HBM3", "2026-01-02") == "nvidia-h100-80gb-hbm3-2026-01-02.json"
