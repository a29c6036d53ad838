"""IR ops that passes insert (weight-quantized linear): torch.library custom ops with eager and CPU paths."""

from __future__ import annotations

import math
import threading
import weakref
from collections import Counter, defaultdict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from effcompile.runtime.key import contents_version

# Weight formats the IR op understands -> the group sizes each accepts (0 = one scale per output row).
# mx*: blocks of 32 along K sharing a power-of-two scale (MX-style; the int8 scales tensor holds exponents).
FORMATS: dict[str, tuple[int, ...]] = {"int8": (0,), "int4": (32, 64, 128), "fp8": (0,), "mxint8": (32,),
                                       "mxfp8": (32,)}
# Dynamic per-token activation quantization -> the weight formats it pairs with (W8A8, FP8 x FP8).
ACTIVATIONS: dict[str, tuple[str, ...]] = {"none": tuple(FORMATS), "int8": ("int8", "mxint8"),
                                           "fp8": ("fp8", "mxfp8")}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
_QMAX = {"mxint8": 127.0, "mxfp8": FP8_MAX}

# Which implementation of wq_linear ran: PATH_COUNTS["wq_linear"]["int8pack" | "int4pack" | "dequant"].
PATH_COUNTS: defaultdict[str, Counter] = defaultdict(Counter)
# Why a packed CPU op was not used (format, dtype) -> reason; explain()/benchmarks read it.
FAST_PATH_DISABLED: dict[tuple[str, torch.dtype], str] = {}

_LOCK = threading.Lock()
_INT4_CPU: dict[tuple, tuple] = {}  # (id(qweight), version, dtype) -> (tinygemm-packed weight, scale+zero)
_CHECKED: set[tuple[str, torch.dtype]] = set()


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: str
    group_size: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def check_format(fmt: str, group_size: int, act: str = "none") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"weight format {fmt!r} is not supported; supported: {sorted(FORMATS)}")
    if group_size not in FORMATS[fmt]:
        raise ValueError(f"group_size {group_size} is not supported for {fmt}; supported: {FORMATS[fmt]}")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation quantization {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if fmt not in ACTIVATIONS[act]:
        raise ValueError(f"activations={act!r} pairs with weights {list(ACTIVATIONS[act])}, not {fmt!r}")


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize (the reference definitions every kernel is tested against)
# ---------------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int = 0) -> QuantizedWeight:
    """Quantize a [N, K] float weight. Scales/zeros keep the weight's dtype (as torchao does).

    int8: per-row symmetric, w ~= q * s, q in [-127, 127].
    int4: per (row, group of K) asymmetric, w ~= q * s + z with q in [0, 15]; the group's range is
          shrunk by the factor (of _INT4_SHRINK) that minimizes its squared error (outliers cost
          less than a coarser grid); two values per byte, the even k in the low nibble.
    """
    return _quantize(w, fmt, group_size)  # passes call this name; tests patch it to prove no re-quantize


_INT4_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _int4_codes(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    # Round the stored scale/zero first, so the integer codes are chosen against what dequant will use.
    s = ((hi - lo) / 15.0).clamp_min(1e-8).to(dtype).float()
    z = lo.to(dtype).float()
    # In place where the value is a fresh temporary: two weight-sized allocations, not eight. The same operations
    # in the same order; only the error's sum may round differently (vecdot), which left every code unchanged
    # on the weights tried (session 19: four shapes, bf16 / fp16 / fp32, groups 32-128).
    q = (g - z[..., None]).div_(s[..., None]).round_().clamp_(0, 15)
    e = (q * s[..., None]).add_(z[..., None]).sub_(g)
    return q, s, z, torch.linalg.vecdot(e, e)


_INT4_BLOCK_ELEMENTS = 1 << 18  # weights per CPU block of int4 quantization (see _quantize)


def _int4_block(wf: torch.Tensor, group_size: int, dtype: torch.dtype):
    """Codes [rows, K / G, G], scales and zeros [rows, K / G] of fp32 rows: of the ranges _INT4_SHRINK makes
    from each group's min and max, the one with the least squared error."""
    g = wf.view(wf.shape[0], -1, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    mid = (hi + lo) / 2
    # Each candidate's error per group, then the codes of the winner alone (the first of equal errors, as
    # before): selecting every candidate's codes with torch.where cost a weight-sized pass per candidate.
    errs = torch.stack([_int4_codes(g, mid - (mid - lo) * r, mid + (hi - mid) * r, dtype)[3] for r in _INT4_SHRINK])
    r = torch.tensor(_INT4_SHRINK, dtype=torch.float32, device=errs.device)[errs.argmin(0)]
    q, s, z, _ = _int4_codes(g, mid - (mid - lo) * r, mid + (hi - mid) * r, dtype)
    return q.to(torch.uint8), s, z


def _quantize(w: torch.Tensor, fmt: str, group_size: int = 0) -> QuantizedWeight:
    check_format(fmt, group_size)
    if w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_weight needs a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    n, k = w.shape
    wf = w.detach().float()
    if fmt == "fp8":
        s = (wf.abs().amax(1) / FP8_MAX).clamp_min(1e-12)
        q = (wf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return QuantizedWeight(q, s.to(w.dtype), None, fmt, 0)
    if fmt in _QMAX:
        if k % group_size:
            raise ValueError(f"K={k} is not divisible by the block size {group_size}")
        g = wf.view(n, k // group_size, group_size)
        # The smallest power of two that brings the block's largest value inside the element range:
        # no block ever saturates (the MX spec's floor(log2(amax)) - emax can clip the top value).
        e = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0**-120) / _QMAX[fmt])).clamp(-127, 127)
        v = g / torch.exp2(e)[..., None]
        q = torch.round(v).clamp(-127, 127).to(torch.int8) if fmt == "mxint8" else v.to(FP8)
        return QuantizedWeight(q.view(n, k), e.to(torch.int8), None, fmt, group_size)
    if fmt == "int8":
        s = (wf.abs().amax(1) / 127.0).clamp_min(1e-12)
        q = torch.round(wf / s[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(q, s.to(w.dtype), None, fmt, 0)
    if k % group_size or k % 2:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}")
    # On the CPU, a few rows at a time: each candidate range makes several weight-sized fp32 temporaries, and
    # blocks of ~1 MB keep them in cache (llama-1b's 112 linears: 54 -> 14 s on the 2-core box). On a GPU
    # (memory bound too, but fast) one block: more launches would cost more than they save.
    rows = n if wf.is_cuda else max(1, _INT4_BLOCK_ELEMENTS // k)
    parts = [_int4_block(wf[i:i + rows], group_size, w.dtype) for i in range(0, n, rows)]
    q, s, z = (torch.cat(t) if len(parts) > 1 else t[0] for t in zip(*parts, strict=True))
    q = q.view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedWeight(packed.contiguous(), s.to(w.dtype), z.to(w.dtype), fmt, group_size)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K//2] uint8 -> [N, K] uint8 codes in 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize(qweight, scales, zeros, fmt: str, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """The float [N, K] weight the quantized one stands for (computed in fp32, returned as ``dtype``)."""
    if fmt in ("int8", "fp8"):
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    if fmt in _QMAX:
        n, k = qweight.shape
        g = qweight.float().view(n, k // group_size, group_size) * torch.exp2(scales.float())[..., None]
        return g.view(n, k).to(dtype)
    if fmt == "int4":
        q = unpack_int4(qweight).float()
        n, k = q.shape
        g = q.view(n, k // group_size, group_size) * scales.float()[..., None] + zeros.float()[..., None]
        return g.view(n, k).to(dtype)
    raise ValueError(f"weight format {fmt!r} is not supported; supported: {sorted(FORMATS)}")


def quantize_activation(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (last dim) symmetric quantization: (codes, fp32 scale [..., 1])."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    if act == "int8":
        s = (amax / 127.0).clamp_min(1e-12)
        return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s
    s = (amax / FP8_MAX).clamp_min(1e-12)
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def fake_quantize_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """x as the quantized activation stands for it (in x's dtype); identity for act="none"."""
    if act == "none":
        return x
    q, s = quantize_activation(x, act)
    return (q.float() * s).to(x.dtype)


def reference(x, qweight, scales, zeros, bias, fmt: str, group_size: int, act: str = "none") -> torch.Tensor:
    """Eager reference: quantize-dequantize the activations (if asked), dequantize the weight to the
    activation dtype, then F.linear."""
    w = dequantize(qweight, scales, zeros, fmt, group_size, x.dtype)
    return F.linear(fake_quantize_activation(x, act), w, None if bias is None else bias.to(x.dtype))


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's compute_error convention)."""
    ref, approx = ref.detach().float(), approx.detach().float()
    noise = (ref - approx).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))


def weight_sqnr(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """sqnr(w, dequantize(qw)) from blocks of rows, so on the CPU no weight-sized fp32 temporaries leave the
    cache (as _quantize's blocks; every format's codes, scales and zeros are per output row)."""
    n, k = w.shape
    rows = n if w.is_cuda else max(1, _INT4_BLOCK_ELEMENTS // k)
    signal = noise = 0.0
    for r in range(0, n, rows):
        part = w[r:r + rows].detach().float()
        dq = dequantize(qw.qweight[r:r + rows], qw.scales[r:r + rows],
                        None if qw.zeros is None else qw.zeros[r:r + rows], qw.fmt, qw.group_size)
        signal += float(part.square().sum())
        noise += float(dq.sub_(part).square_().sum())
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise)


# ---------------------------------------------------------------------------------------------
# CPU fast paths: torch's packed int8 / int4 matmuls, used only once checked against the reference
# ---------------------------------------------------------------------------------------------


def _has(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _int4_cpu_packed(qweight, scales, zeros, group_size, dtype):
    """Repack our plain nibbles into the CPU tinygemm layout once per weight (cached, freed with it)."""
    key = (id(qweight), contents_version(qweight), dtype)
    hit = _INT4_CPU.get(key)
    if hit is not None:
        return hit
    codes = unpack_int4(qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    # tinygemm dequantizes (q - 8) * s + z', so z' = z + 8 s; layout [K // g, N, 2].
    s, z = scales.float(), zeros.float()
    sz = torch.stack((s, z + 8 * s), dim=-1).transpose(0, 1).contiguous().to(dtype)
    with _LOCK:
        _INT4_CPU[key] = (packed, sz)
    weakref.finalize(qweight, _INT4_CPU.pop, key, None)
    return packed, sz


# torch's packed CPU ops are GEMV-style kernels: measured here they lose to dequantize + a BLAS matmul
# as soon as there are more than a few rows (MiniLM 8x64 prefill: 6.8 s packed vs dense 0.39 s), so
# they serve decode-shaped calls only. Except int4 with 16-bit activations (session 17, dev box, AVX512, bf16,
# 2048x768 g128): 3.4 ms at 128 rows against ~4 ms just to dequantize, so it takes every row count.
PACKED_MAX_ROWS = 8
PACKED_DTYPES = (torch.bfloat16, torch.float16)  # where the packed ops beat the CPU bag GEMV (codegen/lower.py)
# int4 with fp32 activations runs the same bf16 kernel on x rounded to bf16: torch's int4 CPU matmul with fp32
# activations is slow, and so is FBGEMM's 4-bit bag (llama-1b fp32 decode with int4 linears was 0.88x eager through
# the bags). Session 22, 2-core box, weights streaming from DRAM, one row, Llama-3.2-1B shapes: 3.3-3.6x dense fp32
# and 2.9-4.7x the bag; rounding x to bf16 adds 0.3 % relative error to outputs whose int4 weights already differ
# from the fp32 ones by several percent. It takes prefill rows too, as for bf16: 16 / 128 / 512 rows of 16384x2048
# in 7 / 53 / 231 ms against 245 / 263 / 331 ms for the bag path's dequantize + matmul (fp32 dense: 13 / 35 / 119).
# Not int8: the same rounding before torch's packed int8 kernel made llama-1b's int8 decode 1.40x -> 1.60x eager
# (1.42x -> 1.82x with the head) but moved its logits 14 % further from fp32 (cosine 0.99881 -> 0.99864), a visible
# share of int8's own error (session 22, not shipped).
BF16_ACTIVATIONS = {("int4", torch.float32)}


def packed_cpu_unavailable(fmt: str, dtype: torch.dtype, out_features: int) -> str | None:
    """None when wq_linear's eager path runs torch's packed CPU matmul for this format, activation dtype and
    weight, and it beats the CPU bag GEMV (16-bit activations only; checked against the reference once per
    format and dtype), else why not."""
    if fmt not in ("int8", "int4"):
        return f"no packed CPU matmul for {fmt!r}"
    if dtype not in PACKED_DTYPES and (fmt, dtype) not in BF16_ACTIVATIONS:
        return f"{dtype} activations: torch's packed CPU matmuls lose to the bag GEMV there"
    if fmt == "int4" and out_features % 16:
        return f"int4 out_features={out_features} is not a multiple of 16"
    _self_check(fmt, dtype)
    return FAST_PATH_DISABLED.get((fmt, dtype))


def _fast_cpu(x2, qweight, scales, zeros, fmt, group_size) -> tuple[torch.Tensor, str] | None:
    n = qweight.shape[0]
    if x2.shape[0] > PACKED_MAX_ROWS and fmt == "int8" and x2.dtype in PACKED_DTYPES:
        # The codes in x's dtype (exact), one matmul, the scales after: what the CPU bag GEMV's dense path does
        # (llama-base bf16 prefill of 128 tokens: 87-115 ms that way, 142-145 ms dequantizing in fp32 first).
        return (x2 @ qweight.to(x2.dtype).t()) * scales.to(x2.dtype), "int8-dense"
    rounded = (fmt, x2.dtype) in BF16_ACTIVATIONS
    if x2.shape[0] > PACKED_MAX_ROWS and not (fmt == "int4" and (x2.dtype in PACKED_DTYPES or rounded)):
        return None
    if fmt == "int8" and _has("_weight_int8pack_mm"):
        return torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(x2.dtype)), "int8pack"
    if (fmt == "int4" and n % 16 == 0 and _has("_weight_int4pack_mm_for_cpu")
            and _has("_convert_weight_to_int4pack_for_cpu")):
        dt = torch.bfloat16 if rounded else x2.dtype
        packed, sz = _int4_cpu_packed(qweight, scales, zeros, group_size, dt)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dt), packed, group_size, sz)
        return (y.to(x2.dtype), "int4pack-bf16x") if rounded else (y, "int4pack")
    return None


def _self_check(fmt: str, dtype: torch.dtype) -> None:
    """Disable a packed op (per format and dtype) unless it matches the reference on an odd shape."""
    key = (fmt, dtype)
    if key in _CHECKED:
        return
    _CHECKED.add(key)
    gen = torch.Generator().manual_seed(0)
    group = FORMATS[fmt][0]
    x = torch.randn(3, 96, generator=gen).to(dtype)
    qw = _quantize(torch.randn(48, 96, generator=gen) / 10, fmt, group)
    try:
        got = _fast_cpu(x, qw.qweight, qw.scales, qw.zeros, fmt, group)
    except Exception as e:  # an op that exists but refuses these inputs on this torch version
        FAST_PATH_DISABLED[key] = f"{type(e).__name__}: {e}"
        return
    if got is None:
        FAST_PATH_DISABLED[key] = "no packed CPU op in this torch build"
        return
    want = reference(x.float(), *qw[:3], None, fmt, group)
    err = (got[0].float() - want).abs().max().item()
    tol = 0.1 if dtype != torch.float32 else 1e-2 if (fmt, dtype) in BF16_ACTIVATIONS else 1e-3
    if not err <= tol * max(1.0, want.abs().max().item()):
        FAST_PATH_DISABLED[key] = f"packed op disagrees with the reference (max err {err:.3g})"


def _w8a8(x, qweight, scales, bias) -> torch.Tensor:
    """int8 x int8 -> int32 matmul (torch._int_mm), rescaled by the token and channel scales."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_activation(x2, "int8")
    y = torch._int_mm(xq, qweight.t()).float() * sx * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


# Output epilogues a linear op may carry (passes/fuse_gated_activation.py): "silu_mul" reads outputs 2i and 2i + 1
# as a gate and its up projection and gives silu(gate) * up, N / 2 outputs.
EPILOGUES = ("none", "silu_mul")


def apply_epilogue(y: torch.Tensor, epilogue: str) -> torch.Tensor:
    """What a linear op's epilogue computes on its [..., N] output, in its dtype, as the unfused graph did
    (F.silu of the gate, rounded, times the up projection)."""
    if epilogue == "none":
        return y
    if epilogue != "silu_mul":
        raise ValueError(f"epilogue={epilogue!r} is not one of {EPILOGUES}")
    return torch.nn.functional.silu(y[..., 0::2]) * y[..., 1::2]


def wq_linear_eager(x, qweight, scales, zeros, bias, fmt: str, group_size: int, act: str = "none") -> torch.Tensor:
    """What the IR op runs outside Triton: a packed CPU op when it is checked, else dequant + linear."""
    if act != "none":
        if act == "int8" and fmt == "int8" and x.numel() and hasattr(torch, "_int_mm"):
            PATH_COUNTS["wq_linear"]["w8a8-int-mm"] += 1
            return _w8a8(x, qweight, scales, bias)
        PATH_COUNTS["wq_linear"]["fake-quant"] += 1
        return reference(x, qweight, scales, zeros, bias, fmt, group_size, act)
    if fmt not in ("int8", "int4"):  # fp8 / MX formats: no packed CPU op; dequantize + matmul
        PATH_COUNTS["wq_linear"]["dequant"] += 1
        return reference(x, qweight, scales, zeros, bias, fmt, group_size)
    if x.device.type == "cpu" and x.dtype in FLOAT_DTYPES and x.numel():
        _self_check(fmt, x.dtype)
        if (fmt, x.dtype) not in FAST_PATH_DISABLED:
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            got = _fast_cpu(x2, qweight, scales, zeros, fmt, group_size)
            if got is not None:
                out, path = got
                if bias is not None:
                    out = out + bias.to(out.dtype)
                PATH_COUNTS["wq_linear"][path] += 1
                return out.view(*x.shape[:-1], qweight.shape[0])
    PATH_COUNTS["wq_linear"]["dequant"] += 1
    return reference(x, qweight, scales, zeros, bias, fmt, group_size)


if not hasattr(torch.ops.effcompile, "wq_linear"):

    @torch.library.custom_op("effcompile::wq_linear", mutates_args=())
    def wq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bias: torch.Tensor | None, fmt: str, group_size: int, act: str = "none",
                  epilogue: str = "none") -> torch.Tensor:
        """y = quant(x) @ dequantize(qweight).T + bias, for the weight formats in FORMATS and the
        dynamic activation quantization in ACTIVATIONS; then its epilogue (EPILOGUES)."""
        return apply_epilogue(wq_linear_eager(x, qweight, scales, zeros, bias, fmt, group_size, act), epilogue)

    @wq_linear.register_fake
    def _wq_linear_fake(x, qweight, scales, zeros, bias, fmt, group_size, act="none", epilogue="none"):
        return x.new_empty((*x.shape[:-1], qweight.shape[0] // (1 if epilogue == "none" else 2)))


def wq_linear_op():
    """The OpOverload passes insert (``torch.ops.effcompile.wq_linear.default``)."""
    return torch.ops.effcompile.wq_linear.default


__all__ = ["ACTIVATIONS", "BF16_ACTIVATIONS", "EPILOGUES", "FORMATS", "apply_epilogue", "FP8", "PATH_COUNTS", "packed_cpu_unavailable", "fake_quantize_activation", "quantize_activation", "QuantizedWeight", "check_format", "dequantize", "quantize_weight",
           "reference", "sqnr", "unpack_int4", "wq_linear_eager", "wq_linear_op"]
