"""Every Triton kernel the launchers pick compiles for sm_80 / sm_90 (PTX and a cubin), here, without a GPU.

The interpreter runs a kernel's numerics on CPU but accepts code the GPU compiler rejects (dtype mixes in
tl.dot, layouts, fp8 conversions, inline assembly it cannot run), and under it bf16 dots run in fp32. So each
launcher is called on CPU tensors as if they were on a GPU, its launch is recorded instead of run, and triton
compiles that exact call ahead of time for a named target (codegen/aot.py). This checks that the kernels
build, not their speed or numerics.
"""

from __future__ import annotations

import re

import pytest
import torch
from cg_util import capture
from test_kernels_interpreter import CASES, _inputs

from effcompile.codegen import aot
from effcompile.codegen.kernels import dequant_matmul as D
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.codegen.kernels import sparse_gemv as S
from effcompile.codegen.lower import lower
from effcompile.compiler import ops as qops
from effcompile.compiler import sparse_linear as sl


@pytest.fixture
def launches():
    """Record (kernel, args, kwargs) of every launch instead of running it, as a GPU launcher would pass them."""
    with aot.record_launches() as seen:
        yield seen


def _compile(launch, cap: int):
    compiled = aot.compile_launch(launch, cap)
    assert compiled.asm["cubin"], "no cubin"
    return compiled


def _compile_all(seen, cap: int = 90):
    assert seen, "the launcher launched nothing"
    for launch in seen:
        _compile(launch, cap)


def _weights(fmt, n, k, dtype, group):
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / 20).to(dtype)
    return qops.quantize_weight(w, fmt, group)


# e4m3 loads need sm_89+ (supported() sends fp8 formats to the eager path below that): sm_90 only.
_DEQUANT = [(f, g, cap) for f, g in [("int8", 0), ("int4", 32), ("int4", 128), ("fp8", 0), ("mxint8", 32),
                                     ("mxfp8", 32)] for cap in ((90,) if "fp8" in f else (80, 90))]


@pytest.mark.parametrize("m", [1, 24])  # decode (split-K, atomics) and prefill tiles
@pytest.mark.parametrize("fmt,group,cap", _DEQUANT, ids=[f"{f}-g{g}-sm{c}" for f, g, c in _DEQUANT])
def test_dequant_matmul_compiles(fmt, group, cap, m, launches):
    dtype = torch.bfloat16 if m == 1 else torch.float16
    qw = _weights(fmt, 96, 256, dtype, group)
    x = torch.randn(m, 256, dtype=dtype)
    lora = (torch.randn(8, 256, dtype=dtype), torch.randn(96, 8, dtype=dtype)) if fmt == "int4" else (None, None)
    D.launch(x, *qw[:3], torch.randn(96, dtype=dtype), fmt, group, split_k=2 if m == 1 else None,
             lora_a=lora[0], lora_b=lora[1])
    _compile_all(launches, cap)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_fma_decode_variants_compile(m, launches):
    # launch_plan.Config.fma: BLOCK_M 1 / 4 / 8 with products summed in registers, for every kernel branch
    # (int8, int4, MX, the EoRA term) and the sparse GEMV's three formats, at tile shapes the sweep tries.
    dtype = torch.bfloat16
    x = torch.randn(m, 256, dtype=dtype)
    for fmt, group in (("int8", 0), ("int4", 128), ("mxint8", 32)):
        qw = _weights(fmt, 96, 256, dtype, group)
        lora = (torch.randn(8, 256, dtype=dtype), torch.randn(96, 8, dtype=dtype)) if fmt == "int4" else (None, None)
        D.launch(x, *qw[:3], None, fmt, group, config=plan.Config(64, 128, 4, 1, 2, fma=True),
                 lora_a=lora[0], lora_b=lora[1])
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    for fmt, group in (("float", 0), ("int8", 0), ("int4", 64)):
        qw = qops.quantize_weight(w, fmt, group) if fmt != "float" else None
        wt, s, z = sl.to_input_major(w if qw is None else qw.qweight, *((None, None) if qw is None else
                                                                      (qw.scales, qw.zeros)), fmt, group)
        S.launch(x, torch.tensor(0.5), wt, s, z, None, fmt, group,
                 config=plan.Config(128, 32, 4, 1, 8, fma=True, compact=True))
    assert len(launches) == 6 and all(lc.kwargs["FMA"] and lc.kwargs["BLOCK_M"] == max(1, 1 << (m - 1).bit_length())
                                      for lc in launches)
    assert all(lc.kwargs["COMPACT"] == (m == 1) for lc in launches[3:])  # one-row sparse: the compacted path
    _compile_all(launches, 90)


def _sparse_one_row_launches(k: int, config):
    """One bf16 row through the sparse GEMV for float, int8 and int4 (groups of 64) weights [96, k], per-channel
    thresholds, under ``config``."""
    dtype = torch.bfloat16
    w = torch.randn(96, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    for fmt, group in (("float", 0), ("int8", 0), ("int4", 64)):
        qw = qops.quantize_weight(w, fmt, group) if fmt != "float" else None
        wt, s, z = sl.to_input_major(w if qw is None else qw.qweight, *((None, None) if qw is None else
                                                                      (qw.scales, qw.zeros)), fmt, group)
        S.launch(torch.randn(1, k, dtype=dtype), torch.full((k,), 0.5), wt, s, z, None, fmt, group, config=config)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_compacted_sparse_gemv_compiles(stages, launches):
    # One-row Config.compact launches (kept channels compacted through a scratch list, stages 2 prefetching the
    # next chunk in registers) for the three formats, per-channel thresholds, K split at segment boundaries.
    _sparse_one_row_launches(512, plan.Config(128, 16, 4, stages, 2, fma=True, compact=True))
    assert len(launches) == 3 and all(lc.kwargs["COMPACT"] and lc.kwargs["PREFETCH"] == (stages >= 2)
                                      and lc.kwargs["IDX_AHEAD"] == (stages == 3) for lc in launches)
    _compile_all(launches, 90)


@pytest.mark.parametrize("stages", [1, 2, 5])
def test_flat_compacted_sparse_gemv_compiles_with_no_barrier_in_its_chunk_loop(stages, launches):
    # Config.flat for the three formats (K split in 2, per-channel thresholds; stages 5: four chunks prefetched).
    # Its point in SASS (sm_90): one loop over every chunk of the split with no barrier in it (the per-segment
    # path has a scan and a barrier each segment), and int4's scale reload an if-body the common path skips.
    _sparse_one_row_launches(1024, plan.Config(128, 16, 4, stages, 2, fma=True, compact=True, flat=True))
    assert len(launches) == 3 and all(lc.kwargs["FLAT"] and lc.kwargs["PREFETCH"] == stages - 1 for lc in launches)
    for launch in launches:
        loops = aot.loops(aot.sass(_compile(launch, 90)))
        chunk_loop = loops[-1]  # after the compaction loop(s)
        assert not any(op.startswith("BAR") for op in chunk_loop.opcodes), chunk_loop.opcodes
        if launch.kwargs["FMT"] == 1:
            assert chunk_loop.skippable > 100, "the int4 scale reload is not a skipped if-body"


@pytest.mark.parametrize("per_channel", [False, True])
def test_masked_one_row_sparse_gemv_with_prefetch_compiles(per_channel, launches):
    # One-row float / int8 fma launches that visit every chunk (compact=False), stages 2: the next chunk's x,
    # thresholds and kept rows loaded in registers before this chunk's arithmetic.
    dtype = torch.bfloat16
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
    thr = torch.full((512,), 0.5) if per_channel else torch.tensor(0.5)
    for fmt in ("float", "int8"):
        qw = qops.quantize_weight(w, fmt, 0) if fmt != "float" else None
        wt, s, z = sl.to_input_major(w if qw is None else qw.qweight, None if qw is None else qw.scales, None, fmt, 0)
        S.launch(torch.randn(1, 512, dtype=dtype), thr, wt, s, z, None, fmt, 0,
                 config=plan.Config(256, 16, 4, 2, 2, fma=True))
    assert len(launches) == 2 and all(lc.kwargs["PREFETCH"] and not lc.kwargs["COMPACT"] for lc in launches)
    _compile_all(launches, 90)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_and_activation_quantizers_compile(dtype, launches):
    qw = _weights("int8", 96, 256, dtype, 0)
    for act, m in (("int8", 1), ("int8", 24), ("fp8", 3)):
        D.launch(torch.randn(m, 256, dtype=dtype), *qw[:3], None, "int8", 0, act=act)
    wide = _weights("int8", 96, 1024, dtype, 0)  # K long enough for 2 splits: the split-K workspace epilogue
    D.launch(torch.randn(2, 1024, dtype=dtype), *wide[:3], None, "int8", 0, act="int8", split_k=2)
    assert launches[-1].kwargs["SPLIT"] == 2
    _compile_all(launches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt,group", [("float", 0), ("int8", 0), ("int4", 64)])
def test_sparse_gemv_compiles(fmt, group, dtype, launches):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    if fmt == "float":
        wt, s, z = sl.to_input_major(w, None, None, "float", 0)
    else:
        qw = qops.quantize_weight(w, fmt, group)
        wt, s, z = sl.to_input_major(qw.qweight, qw.scales, qw.zeros, fmt, group)
    for thr in (torch.tensor(0.5), torch.full((256,), 0.5)):  # per tensor and per channel
        S.launch(torch.randn(3, 256, dtype=dtype), thr, wt, s, z, torch.randn(96, dtype=dtype), fmt, group, split_k=2)
    _compile_all(launches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 128)])
def test_quantized_sparse_gemm_compiles(fmt, group, dtype, launches):
    # Past the decode rows (a prefill) quantized weights run the kernel over M tiles: 70 rows (a partial tile
    # of 64), thresholded and, for a prefill with decode_only thresholds, not.
    qw = _weights(fmt, 256, 512, dtype, group)
    wt, s, z = sl.to_input_major(qw.qweight, qw.scales, qw.zeros, fmt, group)
    for thresholded in (True, False):
        S.launch(torch.randn(70, 512, dtype=dtype), torch.tensor(0.5), wt, s, z, None, fmt, group,
                 thresholded=thresholded)
    assert [lc.kwargs["BLOCK_M"] for lc in launches] == [64, 64] and all(lc.grid[2] == 2 for lc in launches)
    _compile_all(launches)


_INT_TO_FLOAT = re.compile(r"\bcvt\.rn\.(?:f16|bf16|f32)\.[su](?:8|16|32)\b")  # integer-to-float cvt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_int4_and_int8_fma_kernels_decode_codes_without_int_to_float_conversions(dtype, launches):
    # The int4 codes (and int8 ones in fma tiles) become floats through their bits (dequant_matmul.py): an
    # integer-to-float cvt per code issues at a fraction of the FMA rate, and the int4 GEMV that had one
    # reached 24 % of the read peak (H100). int8 dot tiles still convert (bf16 has no 8-bit integer trick).
    qw = _weights("int4", 96, 256, dtype, 128)
    x = torch.randn(1, 256, dtype=dtype)
    D.launch(x, *qw[:3], None, "int4", 128, split_k=2)
    D.launch(x, *qw[:3], None, "int4", 128, config=plan.Config(64, 128, 4, 1, 2, fma=True))
    D.launch(x, *qw[:3], None, "int4", 128, config=plan.Config(64, 128, 4, 2, 2, fma=True))  # PREFETCH
    q64 = _weights("int4", 96, 256, dtype, 64)  # one-row chunks of several groups (GPC 4), with and without PREFETCH
    D.launch(x, *q64[:3], None, "int4", 64, config=plan.Config(32, 256, 4, 1, 1, fma=True))
    D.launch(x, *q64[:3], None, "int4", 64, config=plan.Config(16, 256, 4, 2, 1, fma=True))
    q64_odd = _weights("int4", 94, 384, dtype, 64)  # the same, tiles not dividing N and K: masked loads
    D.launch(torch.randn(1, 384, dtype=dtype), *q64_odd[:3], None, "int4", 64,
             config=plan.Config(32, 256, 4, 2, 1, fma=True))
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    sq = qops.quantize_weight(w, "int4", 64)
    wt, s, z = sl.to_input_major(sq.qweight, sq.scales, sq.zeros, "int4", 64)
    S.launch(x, torch.tensor(0.5), wt, s, z, None, "int4", 64, split_k=2)
    S.launch(x, torch.tensor(0.5), wt, s, z, None, "int4", 64, config=plan.Config(128, 32, 4, 1, 2, fma=True))
    q8 = _weights("int8", 96, 256, dtype, 0)
    D.launch(x, *q8[:3], None, "int8", 0, config=plan.Config(64, 128, 4, 1, 2, fma=True))
    w8, s8, _ = sl.to_input_major(q8.qweight, q8.scales, None, "int8", 0)
    S.launch(x, torch.tensor(0.5), w8, s8, None, None, "int8", 0, config=plan.Config(128, 32, 4, 1, 2, fma=True))
    assert len(launches) == 10 and launches[2].kwargs["PREFETCH"] and launches[4].kwargs["PREFETCH"]
    assert launches[3].kwargs["GPC"] == launches[4].kwargs["GPC"] == launches[5].kwargs["GPC"] == 4
    assert [lc.kwargs["EVEN_NK"] for lc in launches[3:6]] == [True, True, False]
    for launch in launches:
        ptx = _compile(launch, 90).asm["ptx"]
        found = _INT_TO_FLOAT.findall(ptx)
        assert not found, (launch.kernel.fn.__name__, launch.kwargs.get("FMA"), found[:4])
        asm = launch.kwargs.get("I4_ASM") and not launch.kwargs["FMA"]  # 16-bit int4 dots: launch_plan's PTX
        assert ("prmt.b32 t0, t0, 0, 0x4140;" in ptx) == bool(asm), (launch.kernel.fn.__name__, dtype)
    assert sum(bool(lc.kwargs.get("I4_ASM") and not lc.kwargs["FMA"]) for lc in launches) == (
        0 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_generated_row_kernels_compile(dtype, launches, tmp_path, monkeypatch):
    # Every generated kernel kind of the interpreter tests (epilogues, norms, softmax, pointwise chains).
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # generate kernels on CPU, and pick them at call time
    kernels = 0
    for name, fn in CASES.items():
        args = _inputs(fn, (3,), 96, dtype, torch.Generator().manual_seed(0))
        gm = capture(fn, *args)
        res = lower(gm, tmp_path / name, use_triton=None)  # rewrites gm in place
        assert res.kernels, (name, res.fallbacks)
        kernels += len(res.kernels)
        gm(*args)  # runs the graph: each kernel launch is recorded, not run
    assert len(launches) == kernels
    _compile_all(launches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_rope_and_one_row_rmsnorm_compile(dtype, launches, tmp_path, monkeypatch):
    # A decode step's kernels: RoPE with rotate_half (its other half read at (offs + N // 2) % N) on head views
    # of the projections, and an RMSNorm of one row (a [1, 1, 1] rowscalar).
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def rms(x, w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    q, k = torch.randn(1, 1, 4, 64).to(dtype).transpose(1, 2), torch.randn(1, 1, 2, 64).to(dtype).transpose(1, 2)
    cos, sin = torch.randn(1, 1, 64).to(dtype), torch.randn(1, 1, 64).to(dtype)
    x, w = torch.randn(1, 1, 96).to(dtype), torch.randn(96).to(dtype)
    ops = []
    for name, fn, args in (("rope", apply_rotary_pos_emb, (q, k, cos, sin)), ("rms", rms, (x, w))):
        gm = capture(fn, *args)
        res = lower(gm, tmp_path / name, use_triton=None)
        ops += [kk.ops for kk in res.kernels]
        gm(*args)  # records the launches
    assert ops[:2] == [("mul", "rotate_half", "mul", "add")] * 2 and len(ops) == 3
    assert {"mean", "add", "rsqrt", "mul"} <= set(ops[2])  # the whole norm in one kernel
    _compile_all(launches)


@pytest.mark.parametrize("batch", [2, 8], ids=["one-program", "two-programs"])
@pytest.mark.parametrize("use_position", [False, True], ids=["counter", "positions"])
def test_cache_write_compiles(use_position, batch, launches):
    from effcompile.codegen.kernels import cache_write as C

    keys, values = (torch.zeros(batch, 8, 64, 64, dtype=torch.bfloat16) for _ in range(2))
    k = torch.randn(batch, 8, 1, 64).to(torch.bfloat16)
    v = torch.randn(batch, 1, 8, 64).to(torch.bfloat16).transpose(1, 2)
    length = torch.tensor(3)
    C.launch(keys, values, k, v, torch.tensor([3]) if use_position else None, None if use_position else length)
    assert launches[0].kwargs["ONE_PROGRAM"] == (launches[0].grid == (1,))
    for cap in (80, 90):
        _compile_all(launches, cap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads_q", [4, 0], ids=["q-and-k", "k-alone"])
def test_cache_write_with_rotary_embedding_compiles_without_fused_multiply_adds(heads_q, dtype, launches):
    # Eager rounds each product, then the sum. With triton's default FP fusion ptxas got fma.rn.bf16 / .f16 /
    # .f32 here (one rounding: the H200 lane's bf16 / fp16 results were off by an ulp, session 27).
    from effcompile.codegen.kernels import cache_write as C

    b, hk, d = 2, 2, 64
    keys, values = (torch.zeros(b, hk, 64, d, dtype=dtype) for _ in range(2))
    qkv = torch.randn(b, 1, (heads_q + 2 * hk) * d).to(dtype)
    x = qkv[..., :(heads_q + hk) * d].view(b, 1, heads_q + hk, d).transpose(1, 2)
    v = qkv[..., (heads_q + hk) * d:].view(b, 1, hk, d).transpose(1, 2)
    cos, sin = torch.randn(b, 1, 1, d).to(dtype), torch.randn(b, 1, 1, d).to(dtype)
    C.launch(keys, values, x, v, None, torch.tensor(3), (cos, sin, heads_q))
    assert launches[0].kwargs["ROPE"] and launches[0].kwargs["enable_fp_fusion"] is False
    _compile_all(launches, 80)  # (sm_80 has no bf16 add / mul: LLVM writes each as an fma with 1 or -0)
    ptx = _compile(launches[0], 90).asm["ptx"]
    assert "mul.rn." in ptx and "add.rn." in ptx, "no rotary arithmetic found in the PTX"
    assert not re.search(r"\bfma\.", ptx), "a fused multiply-add in the rotary embedding"


@pytest.mark.parametrize("d", [64, 128])
def test_a_batch_one_rotary_cache_write_compiles_as_one_program(d, launches):
    # Llama-3's decode step, 32 q + 8 k heads: one program of 8 (d 64) or 16 (d 128) warps.
    from effcompile.codegen.kernels import cache_write as C

    keys, values = (torch.zeros(1, 8, 64, d, dtype=torch.bfloat16) for _ in range(2))
    qkv = torch.randn(1, 1, 48 * d).to(torch.bfloat16)
    x, v = qkv[..., :40 * d].view(1, 1, 40, d).transpose(1, 2), qkv[..., 40 * d:].view(1, 1, 8, d).transpose(1, 2)
    cos, sin = torch.randn(1, 1, 1, d).to(torch.bfloat16), torch.randn(1, 1, 1, d).to(torch.bfloat16)
    C.launch(keys, values, x, v, None, torch.tensor(3), (cos, sin, 32))
    assert launches[0].grid == (1,) and launches[0].kwargs["num_warps"] == d // 8
    _compile_all(launches, 90)


def test_int4_scale_words_leave_no_synchronous_load_in_the_hot_loop(launches):
    # The point of Config.scale_words (sm_90 SASS, session 11): with 2-byte scale and zero loads the pipeliner
    # left them synchronous in the 8-row int4 tile's K loop (LDG after each chunk's cp.async wait); as int32
    # words they are staged with the weights (LDGSTS), and the loop issues no plain global load.
    qw = _weights("int4", 512, 1024, torch.bfloat16, 128)
    x = torch.randn(8, 1024, dtype=torch.bfloat16)
    for words in (False, True):
        D.launch(x, *qw[:3], None, "int4", 128, config=plan.Config(128, 128, 8, 3, 2, scale_words=words))
    plain, staged = (aot.loops(aot.sass(_compile(launch, 90))) for launch in launches)
    hot_plain, hot_staged = (max(loops, key=lambda lp: lp.instructions) for loops in (plain, staged))
    assert any(op.startswith("LDG.") for op in hot_plain.loads), hot_plain.loads
    assert not any(op.startswith("LDG.") for op in hot_staged.loads), hot_staged.loads


def test_int4_scale_words_on_chunks_of_several_groups_are_refused(launches):
    # Words hold one group's scale per chunk; a chunk of two groups (block_k 256, G 128) used to run with plain
    # 2-byte scales, so the sweep timed a "scale_words" tile that had none (session 22). Now it says so.
    qw = _weights("int4", 512, 1024, torch.bfloat16, 128)
    with pytest.raises(ValueError, match=r"Config.scale_words.*block_k=256 spans 2 groups"):
        D.launch(torch.randn(8, 1024, dtype=torch.bfloat16), *qw[:3], None, "int4", 128,
                 config=plan.Config(128, 256, 8, 3, 2, scale_words=True))
    assert not launches


@pytest.mark.parametrize("cap", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int4_dot_tiles_spanning_groups_compile(dtype, cap, launches):
    # 16-bit dot tiles whose K chunk holds GPC whole groups: [N, GPC, G / 2] bytes decoded by the inline PTX,
    # dequantized per group and reshaped for the dot (decode rows, EoRA off, split-K; and prefill rows).
    qw = _weights("int4", 96, 512, dtype, 64)
    for m in (8, 24):
        D.launch(torch.randn(m, 512, dtype=dtype), *qw[:3], None, "int4", 64, config=plan.Config(32, 256, 4, 3, 2))
    assert [launch.kwargs["GPC"] for launch in launches] == [4, 4]
    _compile_all(launches, cap)


@pytest.mark.parametrize("cap", [80, 90])
def test_gated_epilogues_compile(cap, launches):
    # EPILOGUE 1 (silu(gate) * up before the store): dequant tiles (one-row words, dots, prefill) and the sparse
    # GEMV's three formats, with and without split-K.
    dtype = torch.bfloat16
    qw = _weights("int4", 96, 256, dtype, 128)
    for m, config in ((1, plan.Config(64, 128, 4, 1, 2, fma=True)), (8, None), (24, None)):
        D.launch(torch.randn(m, 256, dtype=dtype), *qw[:3], None, "int4", 128, config=config, epilogue="silu_mul")
    D.launch(torch.randn(1, 256, dtype=dtype), *qw[:3], None, "int4", 128, split_k=1, epilogue="silu_mul")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    for fmt in ("float", "int8", "int4"):
        group = 64 if fmt == "int4" else 0
        q = qops.quantize_weight(w, fmt, group) if fmt != "float" else None
        wt, s, z = sl.to_input_major(w if q is None else q.qweight, *((None, None) if q is None else
                                                                     (q.scales, q.zeros)), fmt, group)
        for split in (1, 2):
            S.launch(torch.randn(1, 256, dtype=dtype), torch.tensor(0.5), wt, s, z, None, fmt, group, split_k=split,
                     epilogue="silu_mul")
    assert len(launches) == 10 and all(launch.kwargs["EPILOGUE"] == 1 for launch in launches)
    _compile_all(launches, cap)


_MEMORY_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(LDG|STG|ATOM|ATOMG|RED|REDG|LDGSTS|LD|ST)\b")


def _memory_before_wait(sass: str) -> list[str]:
    """SASS lines that touch global memory before the first griddepcontrol.wait (ACQBULK) of the kernel."""
    before = []
    for line in sass.splitlines():
        if "ACQBULK" in line:
            return before
        if _MEMORY_OP.match(line):
            before.append(line.strip())
    raise AssertionError("no ACQBULK (griddepcontrol.wait) in the kernel")


_SSA = re.compile(r"^\s*(%[\w.#]+) = (\S+) (.*)$")


def _pointers_loaded_before_wait(ttir: str) -> list[str]:
    """The kernel arguments the TTIR's loads before griddepcontrol.wait read, traced back through the pointer
    arithmetic (splat, broadcast, addptr, ...) to the argument it starts from."""
    defs = {m.group(1): (m.group(2), m.group(3)) for m in map(_SSA.match, ttir.splitlines()) if m}

    def argument(value: str) -> str:
        while value in defs and defs[value][0] in ("tt.splat", "tt.broadcast", "tt.addptr", "tt.expand_dims",
                                                   "tt.reshape", "tt.trans"):
            value = re.search(r"%[\w.#]+", defs[value][1]).group(0)
        return value

    loads = []
    for line in ttir.splitlines():
        if "griddepcontrol.wait" in line or "tt.grid_dependency_wait" in line:  # triton 3.6 / 3.9's TTIR
            return loads
        if (m := _SSA.match(line)) and m.group(2) == "tt.load":
            loads.append(argument(re.search(r"%[\w.#]+", m.group(3)).group(0)))
    raise AssertionError("no griddepcontrol.wait in the kernel")


def test_pdl_launches_wait_before_touching_memory(launches, tmp_path, monkeypatch):
    # Programmatic dependent launch (ops.launch_options): a kernel may start while the one before it still runs,
    # so it must wait (griddepcontrol.wait, ACQBULK in sm_90 SASS) before any global load or store, not only
    # before reading its input: a buffer it writes may have been freed by a kernel that is still running. One
    # launch of every kernel family, with PDL forced on as on an H100.
    from effcompile.codegen import ops as cg_ops
    from effcompile.codegen.kernels import act_quant as AQ
    from effcompile.codegen.kernels import cache_write as C

    monkeypatch.setattr(cg_ops, "pdl", lambda device: True)
    dtype = torch.bfloat16
    qw = _weights("int4", 96, 256, dtype, 128)
    D.launch(torch.randn(1, 256, dtype=dtype), *qw[:3], None, "int4", 128, split_k=2,
             config=plan.Config(32, 256, 4, 2, None, True))  # one-row words with the register prefetch
    D.launch(torch.randn(8, 256, dtype=dtype), *qw[:3], None, "int4", 128, epilogue="silu_mul")
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
    q8 = qops.quantize_weight(w, "int8", 0)
    wt, s, z = sl.to_input_major(q8.qweight, q8.scales, None, "int8", 0)
    for compact in (False, True):
        S.launch(torch.randn(1, 512, dtype=dtype), torch.tensor(0.5), wt, s, z, None, "int8", 0,
                 config=plan.Config(128, 16, 4, 2, 2, fma=True, compact=compact))
    AQ.w8a8(torch.randn(2, 512, dtype=dtype), *q8[:2], None, split_k=2)  # its row quantizer, then the GEMM
    keys, values = (torch.zeros(1, 2, 16, 64, dtype=dtype) for _ in range(2))
    qkv = torch.randn(1, 1, 8 * 64).to(dtype)
    x, v = qkv[..., :6 * 64].view(1, 1, 6, 64).transpose(1, 2), qkv[..., 6 * 64:].view(1, 1, 2, 64).transpose(1, 2)
    C.launch(keys, values, x, v, None, torch.tensor(3), (torch.randn(1, 1, 1, 64).to(dtype),
                                                         torch.randn(1, 1, 1, 64).to(dtype), 4))
    from effcompile.codegen.kernels import decode_attention as DA

    qa, ka, va = torch.randn(1, 8, 1, 64).to(dtype), torch.randn(1, 2, 100, 64).to(dtype), torch.randn(1, 2, 100, 64).to(dtype)
    DA.launch(qa, ka, va, torch.zeros(1, 1, 1, 100, dtype=dtype), None, splits=2)  # the split kernel, then the combine
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # generate the row kernel on CPU (its launch is recorded)
    fn = CASES["rmsnorm_decomposed"]
    args = _inputs(fn, (3,), 96, dtype, torch.Generator().manual_seed(0))
    gm = capture(fn, *args)
    assert lower(gm, tmp_path, use_triton=None).kernels
    gm(*args)
    assert len(launches) == 10, [lc.kernel for lc in launches]
    for i, launch in enumerate(launches):
        assert launch.kwargs["PDL"] and launch.kwargs["launch_pdl"], launch.kwargs
        compiled = _compile(launch, 90)
        assert compiled.metadata.launch_pdl
        sass = aot.sass(compiled)
        assert "PREEXIT" in sass  # griddepcontrol.launch_dependents: the next kernel may launch
        if i == 0:
            # The one-row int4 loop of several groups (int4_rows.chunks_of_groups) reads its first chunk of
            # weights before the wait, and only those: weights are never written by a kernel.
            assert set(_pointers_loaded_before_wait(compiled.asm["ttir"])) == {"%q_ptr"}
            assert _memory_before_wait(sass) and all(" LDG." in op for op in _memory_before_wait(sass))
        else:
            assert not _memory_before_wait(sass), (launch.kernel, _memory_before_wait(sass))
            assert not _pointers_loaded_before_wait(compiled.asm["ttir"])


def test_no_pdl_off_the_gpu_or_when_disabled(monkeypatch):
    from effcompile.codegen import ops as cg_ops

    monkeypatch.setattr(cg_ops, "PDL_SEEN", {})  # what explain() reports: not this test's fake devices
    assert cg_ops.launch_options(torch.device("cpu")) == {"PDL": False, "enable_fp_fusion": True}
    monkeypatch.setattr(cg_ops, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cg_ops.launch_options(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True, "enable_fp_fusion": True}
    for major in (8, 12):  # griddepcontrol needs sm_90; sm_120 failed graph capture (ops.pdl)
        monkeypatch.setattr(cg_ops, "_capability", lambda index, major=major: (major, 0))
        assert cg_ops.launch_options(torch.device("cuda", 0)) == {"PDL": False, "enable_fp_fusion": True}
    monkeypatch.setattr(cg_ops, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(cg_ops, "PDL_ENABLED", False)  # EFFCOMPILE_PDL=0
    assert cg_ops.launch_options(torch.device("cuda", 0)) == {"PDL": False, "enable_fp_fusion": True}
    monkeypatch.setattr(cg_ops, "PDL_ENABLED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter cannot run griddepcontrol
    assert cg_ops.launch_options(torch.device("cuda", 0)) == {"PDL": False, "enable_fp_fusion": True}


@pytest.mark.parametrize("cap", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_decode_attention_compiles(dtype, cap, launches):
    # GQA groups of 1, 4 and 8 query heads (dot rows padded to 16), head dims 64 / 128, one split (the output
    # written directly) and several (a workspace, then the combine kernel), with and without a mask.
    from effcompile.codegen.kernels import decode_attention as DA

    for hq, hkv, d, splits, masked in ((8, 8, 64, 1, True), (32, 8, 128, 4, True), (16, 2, 64, 3, False)):
        q, k, v = torch.randn(2, hq, 1, d).to(dtype), torch.randn(2, hkv, 300, d).to(dtype), torch.randn(2, hkv, 300, d).to(dtype)
        DA.launch(q, k, v, torch.zeros(2, 1, 1, 300, dtype=dtype) if masked else None, None, splits=splits)
    assert len(launches) == 5  # one direct launch, two split + combine pairs
    _compile_all(launches, cap)
