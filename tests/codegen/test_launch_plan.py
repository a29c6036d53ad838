"""Kernel launch plans: K splits and the per-GPU tuning tables (never trusted unchecked)."""

import json
import logging

import torch

from effcompile.codegen.kernels import launch_plan as plan


def test_k_split_is_a_block_multiple_covering_k():
    cpu = torch.device("cpu")
    assert plan.k_split(10, 1000, 128, cpu) == 1024  # one split off the GPU
    ks = plan.k_split(10, 1000, 128, cpu, force=3)
    assert ks % 128 == 0 and -(-1000 // ks) == 3
    assert plan.k_split(10, 100, 128, cpu, force=8) == 128  # never more splits than K blocks


def test_tuning_tables_merge_and_refuse_bad_files(tmp_path, caplog):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"device": "GPU X", "configs": {"dequant/int4/m1": [64, 256, 4, 3, None]}}))
    later = tmp_path / "b.json"
    later.write_text(json.dumps({"device": "GPU X", "configs": {"dequant/int4/m1": [128, 128, 8, 3, 2]}}))
    other = tmp_path / "c.json"
    other.write_text(json.dumps({"device": "GPU Y", "configs": {"sparse/float/m1": [64, 64, 4, 3, None]}}))
    garbage = tmp_path / "d.json"
    garbage.write_text("{not json")
    bad = tmp_path / "e.json"
    bad.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/int8/m8": ["big", 1, 1, 1]}}))
    with caplog.at_level(logging.WARNING, logger="effcompile.codegen"):
        table = plan.read_tables([good, later, other, garbage, bad, tmp_path / "missing.json"], "GPU X")
    assert table == {"dequant/int4/m1": plan.Config(128, 128, 8, 3, 2)}
    assert sum("ignored" in r.message for r in caplog.records) == 3
    assert plan.tuning_key("sparse", "int4", 1) == "sparse/int4/m1" and plan.tuning_key("dequant", "int8", 5).endswith("m8")
    assert plan.device_file_name("NVIDIA H200") == "NVIDIA_H200.json"


def test_fma_entries_parse_and_a_non_bool_flag_is_refused(tmp_path, caplog):
    ok = tmp_path / "a.json"
    ok.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/float/m1": [128, 32, 4, 1, 64, True]}}))
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/int8/m1": [128, 32, 4, 1, 64, "yes"]}}))
    compact = tmp_path / "c.json"  # the 7th field (Config.compact, session 10); 6-field entries read as False
    compact.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/int4/m1": [256, 16, 4, 1, None, True, True]}}))
    bad_compact = tmp_path / "d.json"
    bad_compact.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/int8/m1": [256, 16, 4, 1, None, True, 1]}}))
    words = tmp_path / "e.json"  # the 8th field (Config.scale_words, session 11)
    words.write_text(json.dumps({"device": "GPU X", "configs": {"dequant/int4/m8": [128, 128, 4, 3, 8, False, False,
                                                                                    True]}}))
    bad_words = tmp_path / "f.json"
    bad_words.write_text(json.dumps({"device": "GPU X", "configs": {"dequant/int4/m1": [64, 128, 4, 1, 8, True, False,
                                                                                        "no"]}}))
    flat = tmp_path / "g.json"  # the 9th field (Config.flat, session 17)
    flat.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/int8/m1/64x64": [256, 16, 4, 3, None, True,
                                                                                         True, False, True]}}))
    bad_flat = tmp_path / "h.json"
    bad_flat.write_text(json.dumps({"device": "GPU X", "configs": {"sparse/int4/m8": [256, 16, 4, 3, None, True, True,
                                                                                      False, 0]}}))
    with caplog.at_level(logging.WARNING, logger="effcompile.codegen"):
        table = plan.read_tables([ok, bad, compact, bad_compact, words, bad_words, flat, bad_flat], "GPU X")
    assert table == {"sparse/float/m1": plan.Config(128, 32, 4, 1, 64, fma=True),
                     "sparse/int4/m1": plan.Config(256, 16, 4, 1, None, True, compact=True),
                     "dequant/int4/m8": plan.Config(128, 128, 4, 3, 8, scale_words=True),
                     "sparse/int8/m1/64x64": plan.Config(256, 16, 4, 3, None, True, True, flat=True)}
    assert not table["sparse/float/m1"].compact and not table["sparse/int4/m1"].scale_words
    assert not table["sparse/int4/m1"].flat
    assert sum("ignored" in r.message for r in caplog.records) == 4


def test_block_m_pads_fma_decode_to_a_power_of_two_and_dots_to_16():
    fma, dot = plan.Config(64, 64, 4, 2, fma=True), plan.Config(64, 64, 4, 2)
    assert [plan.block_m(m, fma) for m in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert [plan.block_m(m, dot) for m in (1, 8, 19, 100)] == [16, 16, 32, 64]
    assert plan.block_m(9, fma) == 16 and not plan.uses_fma(9, fma)  # prefill rows: the dot tiles
    assert not plan.uses_fma(1, None) and not plan.uses_fma(1, dot)


def test_no_tuning_off_the_gpu_or_for_fp32():
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, torch.device("cpu")) is None


def test_committed_tables_parse_and_name_their_device():
    files = sorted(plan.TUNING_DIR.glob("*.json"))
    assert files, "the H200 table measured by benchmarks/kernels.py --sweep should ship with the package"
    for f in files:
        device = json.loads(f.read_text())["device"]
        assert plan.device_file_name(device) == f.name
        table = plan.read_tables([f], device)
        assert table and all(k.split("/")[0] in ("dequant", "sparse") for k in table)


def test_kernel_argument_on_another_device_is_copied_with_one_warning(caplog):
    # A per-call copy means the compiled graph holds the tensor on the wrong device (a sync per call and
    # no CUDA-graph capture): never silent. "meta" stands in for the GPU on a CPU-only machine.
    from effcompile.codegen import ops as cg_ops

    cg_ops._COPY_WARNED.discard("test weight")
    with caplog.at_level("WARNING", logger="effcompile.codegen"):
        for _ in range(3):
            got = cg_ops.on_device(torch.ones(2, 3).t(), torch.device("meta"), "test weight")
            assert got.device.type == "meta" and got.is_contiguous()
        same = torch.ones(4)
        assert cg_ops.on_device(same, same.device, "test weight") is same  # already there: no copy
    warned = [r for r in caplog.records if "test weight is on cpu" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]


# -- split-K without a memset or a cast: the self-cleaning workspace ----------------------------------------


def _split_launches():
    """(name, launch(x, split_k), reference(x), N) for the three kernels that split K, on small odd shapes."""
    from effcompile.codegen.kernels import act_quant as AQ
    from effcompile.codegen.kernels import dequant_matmul as D
    from effcompile.codegen.kernels import sparse_gemv as S
    from effcompile.compiler import ops as qops
    from effcompile.compiler import sparse_linear as sl

    gen = torch.Generator().manual_seed(0)
    n, k = 94, 640
    w = torch.randn(n, k, generator=gen) / 20
    q4, q8 = qops.quantize_weight(w, "int4", 64), qops.quantize_weight(w, "int8")
    b = torch.randn(n, generator=gen)
    wt, s, z = sl.to_input_major(q4.qweight, q4.scales, q4.zeros, "int4", 64)
    t = torch.tensor(0.3)
    return [
        ("dequant int4", lambda x, sk: D.launch(x, *q4[:3], b, "int4", 64, split_k=sk),
         lambda x: D.reference(x, *q4[:3], b, "int4", 64)),
        ("sparse int4", lambda x, sk: S.launch(x, t, wt, s, z, b, "int4", 64, split_k=sk),
         lambda x: S.reference(x, t, wt, s, z, b, "int4", 64)),
        ("w8a8", lambda x, sk: AQ.w8a8(x, q8.qweight, q8.scales, b, split_k=sk),
         lambda x: D.reference(x, *q8[:3], b, "int8", 0, "int8")),
    ]


def test_split_k_leaves_its_workspace_clean_for_the_next_launch(monkeypatch):
    # Each split adds into a cached fp32 workspace and counts itself in; the last one stores the output and
    # zeroes the workspace and the count. A second and third launch on the same cached workspace must be as
    # right as the first (a leftover sum or count would add to or skip them), and no fp32 output is cast.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(plan, "_WORKSPACES", {})
    for name, launch, reference in _split_launches():
        for seed in range(3):
            x = torch.randn(3, 640, generator=torch.Generator().manual_seed(seed))
            got, want = launch(x, 3), reference(x)
            assert got.dtype == x.dtype
            err = (got - want).abs().max().item() / want.abs().max().item()
            assert err < 1e-4, f"{name}, launch {seed}: relative error {err:.2e}"
        # Launches of one shape share a workspace (one stream runs them in turn); the kernels did use one.
        assert plan._WORKSPACES, name
        for ws, counts in plan._WORKSPACES.values():
            assert ws.dtype == torch.float32 and not ws.any() and not counts.any(), name
    plan._WORKSPACES.clear()
    for name, launch, reference in _split_launches():  # one split: stored directly, no workspace
        x = torch.randn(3, 640, generator=torch.Generator().manual_seed(7))
        assert (launch(x, 1) - reference(x)).abs().max().item() / reference(x).abs().max().item() < 1e-4, name
    assert not plan._WORKSPACES


def test_split_k_workspace_is_per_shape_and_stream():
    cpu = torch.device("cpu")
    a = plan.split_workspace(3, 17, 2, cpu)
    assert plan.split_workspace(3, 17, 2, cpu) is a
    assert plan.split_workspace(3, 18, 2, cpu) is not a and plan.split_workspace(4, 17, 2, cpu) is not a
    assert a[0].shape == (3, 17) and a[1].shape == (2,) and a[1].dtype == torch.int32


def test_untuned_gpus_get_the_measured_fallback(monkeypatch):
    cuda = torch.device("cuda", 0)  # a device object only: _table is replaced, nothing touches a GPU
    monkeypatch.setattr(plan, "_table", lambda index: ({}, {}))
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, cuda) == plan.UNTUNED["dequant/int4/m1"]
    assert plan.tuned("dequant", "int4", 8, torch.bfloat16, cuda) is None  # 2-8 rows: the built-in tiles
    assert plan.tuned("dequant", "int4", 1, torch.float32, cuda) is None  # fp32: FP32 tiles
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, torch.device("cpu")) is None
    own = plan.Config(32, 256, 4, 1, 4, True)
    monkeypatch.setattr(plan, "_table", lambda index: ({"dequant/int4/m1": own}, {}))
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, cuda) == own  # a table entry wins


def test_explain_lists_the_launch_shapes_chosen_and_where_from(monkeypatch):
    from effcompile.codegen import ops as cg_ops
    from effcompile.runtime.report import Report

    cuda = torch.device("cuda", 0)  # a device object only: _table is replaced, nothing touches a GPU
    monkeypatch.setattr(plan, "CHOSEN", {})
    monkeypatch.setattr(cg_ops, "PDL_SEEN", {})
    own, bucket = plan.Config(16, 512, 4, 1, 1, True), plan.Config(64, 128, 4, 1, 8, True)
    monkeypatch.setattr(plan, "_table", lambda index: ({"dequant/int4/m1/2048x2048": own, "sparse/float/m1": bucket},
                                                       {"sparse/float/m1": "GPU Y"}))
    assert str(Report()).count("\n") == 0  # nothing launched on a GPU: no section
    plan.tuned("dequant", "int4", 1, torch.bfloat16, cuda, (2048, 2048))
    plan.tuned("sparse", "float", 1, torch.bfloat16, cuda, (4096, 2048))
    plan.tuned("sparse", "int4", 1, torch.bfloat16, cuda, (4096, 2048))
    plan.tuned("dequant", "int8", 8, torch.bfloat16, cuda, (4096, 2048))
    plan.tuned("dequant", "int8", 1, torch.float32, cuda, (4096, 2048))  # fp32: not a tuned call, not listed
    plan.tuned("dequant", "int8", 1, torch.bfloat16, torch.device("cpu"), (4096, 2048))  # CPU: not listed
    assert Report.launch_shapes() == {
        ("dequant/int4/m1", (2048, 2048)): (own, "tuning table, dequant/int4/m1/2048x2048"),
        ("sparse/float/m1", (4096, 2048)): (bucket, "tuning table, sparse/float/m1 (measured on GPU Y, untimed on this GPU)"),
        ("sparse/int4/m1", (4096, 2048)): (plan.UNTUNED["sparse/int4/m1"], "launch_plan.UNTUNED (no table entry)"),
        ("dequant/int8/m8", (4096, 2048)): (None, "built-in tiles (no table entry)")}
    text = str(Report())
    assert "launch shapes chosen on the GPU" in text
    assert "dequant/int4/m1 2048x2048: (16, 512, 4, 1, 1, True, False, False, False)  from tuning table" in text
    assert "dequant/int8/m8 4096x2048: built-in  from built-in tiles" in text


def test_explain_says_whether_gpu_launches_used_pdl(monkeypatch):
    from effcompile.codegen import ops as cg_ops
    from effcompile.runtime.report import Report

    monkeypatch.setattr(cg_ops, "PDL_SEEN", {})
    cg_ops.launch_options(torch.device("cpu"))
    assert "programmatic dependent launch" not in str(Report())  # CPU launches: nothing to say
    monkeypatch.setattr(cg_ops, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cg_ops.launch_options(torch.device("cuda", 0))  # a device object only: nothing touches a GPU
    assert "cuda:0 with programmatic dependent launch" in str(Report())
    monkeypatch.setattr(cg_ops, "PDL_ENABLED", False)
    cg_ops.launch_options(torch.device("cuda", 0))
    assert "cuda:0 without programmatic dependent launch" in str(Report())


def test_a_table_borrowed_from_another_gpu_says_so_until_a_measured_one_overrides_it(tmp_path):
    borrowed, measured = tmp_path / "a.json", tmp_path / "b.json"
    borrowed.write_text(json.dumps({"device": "GPU X", "measured_on": "GPU Y", "configs": {
        "sparse/float/m1": [512, 16, 4, 1, None, True], "dequant/int8/m1": [32, 128, 4, 3, None, False]}}))
    measured.write_text(json.dumps({"device": "GPU X", "configs": {"dequant/int8/m1": [64, 128, 4, 3, None, False]}}))
    where: dict[str, str] = {}
    table = plan.read_tables([borrowed, measured], "GPU X", where)
    assert table["dequant/int8/m1"].block_n == 64 and where == {"sparse/float/m1": "GPU Y"}
    # A borrowed table's entries re-measured on its own GPU since lose the mark; a listed key it lacks is refused.
    borrowed.write_text(json.dumps(json.loads(borrowed.read_text()) | {"measured_here": ["sparse/float/m1"]}))
    where = {}
    assert plan.read_tables([borrowed], "GPU X", where) and where == {"dequant/int8/m1": "GPU Y"}
    borrowed.write_text(json.dumps(json.loads(borrowed.read_text()) | {"measured_here": ["sparse/int4/m1"]}))
    assert plan.read_tables([borrowed], "GPU X") == {}
    shipped = json.loads((plan.TUNING_DIR / "NVIDIA_H200.json").read_text())
    assert shipped["measured_on"] == "NVIDIA H100 80GB HBM3"  # session 18's copy, partly re-swept on an H200
    assert set(shipped["measured_here"]) == {"sparse/int4/m1", "sparse/int4/m1/2048x2048", "dequant/int4/m1"}


def test_a_weight_shapes_own_entry_wins_over_its_bucket(tmp_path, monkeypatch, caplog):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"device": "GPU X", "configs": {
        "dequant/int4/m1": [64, 128, 4, 1, 8, True], "dequant/int4/m1/2048x2048": [16, 512, 4, 1, 1, True],
        "dequant/int4/m1/2048": [32, 256, 4, 1, 1, True]}}))  # a malformed shape key: the file is refused
    with caplog.at_level(logging.WARNING, logger="effcompile.codegen"):
        assert plan.read_tables([f], "GPU X") == {}
    assert "kernel/format/m1|m8[/NxK]" in caplog.text
    data = json.loads(f.read_text())
    del data["configs"]["dequant/int4/m1/2048"]
    f.write_text(json.dumps(data))
    table = plan.read_tables([f], "GPU X")
    assert plan.tuning_key("dequant", "int4", 1, (2048, 2048)) == "dequant/int4/m1/2048x2048"
    monkeypatch.setattr(plan, "_table", lambda index: (table, {}))
    cuda = torch.device("cuda", 0)  # a device object only: nothing touches a GPU
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, cuda, (2048, 2048)) == plan.Config(16, 512, 4, 1, 1, True)
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, cuda, (3072, 2048)) == plan.Config(64, 128, 4, 1, 8, True)
    assert plan.tuned("dequant", "int4", 1, torch.bfloat16, cuda) == plan.Config(64, 128, 4, 1, 8, True)
    # the shape's entry is for its own bucket only: 8 rows fall back to UNTUNED / the built-in tiles
    assert plan.tuned("dequant", "int4", 8, torch.bfloat16, cuda, (2048, 2048)) is None
