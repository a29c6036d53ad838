"""Fused dequantize + matmul Triton kernel (int8 / fp8 per-channel, int4 group-wise, MX blocks): split-K for decode, tiles for prefill.

Optionally with an EoRA low-rank term (passes/eora.py): y = x W_q^T + (x A^T) B^T, the B product added to the
accumulator before the single store, so the side path costs no extra read/write of the [M, N] output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops
from effcompile.codegen.kernels import act_quant as aq
from effcompile.codegen.kernels import epilogue as _epilogue
from effcompile.codegen.kernels import int4_rows
from effcompile.codegen.kernels import launch_plan as plan
from effcompile.compiler import ops as qops

NAME = "dequant_linear"  # the custom op (effcompile::dequant_linear) and its PATH_COUNTS key
GEMV_MAX_M = plan.GEMV_MAX_M  # rows of activations up to which the GEMV (decode) kernel runs
# Kernel branch per weight format. int8 and fp8 share one: codes times a per-row scale, the code's own
# element type (int8 / float8e4nv, loaded as such) decides the decode. mxint8 and mxfp8 likewise share the
# MX branch (codes times 2**exponent per block of 32 along K).
_FMT = {"int8": 0, "fp8": 0, "int4": 1, "mxint8": 2, "mxfp8": 2}
_FP8_FORMATS = ("fp8", "mxfp8")

# Interpreter note (codegen/README.md): only tl builtins and tl.reduce with triton's own combine
# functions; no tl.sum or plain @triton.jit helpers, which the interpreter cannot run when TRITON_INTERPRET
# was set after `import triton`. Our helpers are ops.kernel_helper functions, which it can.


@triton.jit
def _matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, u_ptr, lb_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, K_SPLIT,
                   SPLITS, RANK,
                   FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                   DOT_DT: tl.constexpr, I4_BITS: tl.constexpr, I4_OFF: tl.constexpr, I4_ASM: tl.constexpr,
                   EVEN_NK: tl.constexpr, GPC: tl.constexpr, EPILOGUE: tl.constexpr,
                   SPLIT: tl.constexpr, FMA: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
                   X_PAIRS: tl.constexpr = False):
    # First: with PDL, nothing may read another kernel's output before it. One-row int4 chunks of several groups
    # wait inside int4_rows.chunks_of_groups instead, after loading their first weights (no kernel writes those).
    EARLY_WEIGHTS: tl.constexpr = FMT == 1 and FMA and BLOCK_M == 1 and GPC > 1
    if not EARLY_WEIGHTS:
        _ops.wait_for_producers(PDL)
    # Tiled tl.dot: the weight tile is dequantized in registers right before the dot (never in memory).
    # Decode (few rows) pads M to 16 for the tensor cores and splits K over programs, so a handful of output
    # tiles still fills every SM: SPLIT (launch_plan.SPLIT_*) 2 adds fp32 partial sums into a self-cleaning
    # workspace and the last split of a tile stores the output; 1 adds them into a zeroed fp32 output.
    # FMA (decode only, BLOCK_M = the rows padded to a power of two) replaces each dot by products summed
    # over K in registers: no 16-row padding and no shared-memory staging of the weight tile; which is
    # faster on a given GPU is for the tuning sweep to say (launch_plan.Config.fma).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row = offs_m.to(tl.int64)[:, None] * K
    col = offs_n.to(tl.int64)[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a @jit helper
    if FMT == 0 and FMA and BLOCK_M == 1:
        # One row, int8 / e4m3 codes: products kept per [k, output] and summed over K once, after the loop (as
        # the one-row int4 branch below does); a sum over each chunk's K crossed warps through shared memory, 7
        # barriers a chunk for (32, 128, 4, 1) (sm_90 SASS, triton 3.6).
        acc1 = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        xrow = x_ptr + pid_m.to(tl.int64) * K
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xk = tl.load(xrow + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(q_ptr + col * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if q_ptr.dtype.element_ty == tl.int8:  # by the bits: 2**23 + 128 + c, exact
                wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            else:
                wf = w.to(tl.float32)
            acc1 += xk[:, None] * wf
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = tl.reduce(acc1, 0, tl.standard._sum_combine)[None, :] * s[None, :]
    elif FMT == 0:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            x = tl.load(x_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # other=0.0, not 0: the interpreter cannot cast an int array to float8e4nv.
            w = tl.load(q_ptr + col * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            # int8 and e4m3 codes are exact in fp16/bf16/fp32 (e4m3: 4 significant bits, 2**-9..448), so
            # the dot runs in the activation dtype and the row scale is applied once, after it.
            if FMA:
                if q_ptr.dtype.element_ty == tl.int8:  # by the bits, as int4 below: 2**23 + 128 + c, exact
                    wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                else:
                    wf = w.to(tl.float32)
                acc += tl.reduce(x.to(tl.float32)[:, :, None] * wf[None, :, :], 1, tl.standard._sum_combine)
            else:
                acc += tl.dot(x.to(DOT_DT), w.to(DOT_DT), input_precision="ieee")
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    elif FMT == 1:
        # int4, groups of G along K, two K values per byte (low nibble: the even one). The launcher keeps
        # BLOCK_K <= G, so a K chunk lies inside one group and its scale and zero are one [N] load each.
        # 16-bit dots (GPU): each weight is dequantized in registers, q s + z in the dot dtype (packed
        # two per instruction, as ops.dequantize rounds it), and the weight tile is the dot's first operand,
        # out^T = W x^T: its N rows fill the 64-row wgmma tiles (sm_90) that a 1-16-row x cannot, and the
        # A operand may come straight from registers. fp32 dots and fma tiles instead apply scale and zero
        # to the partial sum, x . (q s + z) = s (x . q) + z sum(x), which keeps fp32 precision.
        KH = K // 2
        acc_t = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
        if FMA and BLOCK_M == 1 and GPC > 1:
            # One row, chunks of GPC > 1 whole groups (int4_rows.py: [group, word, output] tiles).
            acc += int4_rows.chunks_of_groups(x_ptr, q_ptr, s_ptr, z_ptr, pid_m, offs_n, n_mask, k_lo, k_hi, K, K_SPLIT,
                                              G, GPC, EVEN_NK, PREFETCH, BLOCK_N, BLOCK_K, PDL, X_PAIRS)[None, :]
        elif FMA and BLOCK_M == 1:
            # One row, one group a chunk at most (int4_rows.py: [word, output] tiles).
            acc += int4_rows.one_group_chunks(x_ptr, q_ptr, s_ptr, z_ptr, pid_m, offs_n, n_mask, k_lo, k_hi, K, K_SPLIT,
                                              G, PREFETCH, BLOCK_N, BLOCK_K)[None, :]
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                j_mask = offs_j < k_hi // 2
                # x as one contiguous [BLOCK_M, BLOCK_K] load (vectorized, pipelined), split into the even and odd
                # K values in registers; two stride-2 loads were a 2-byte load instruction per element.
                if EVEN_NK:
                    xmask = m_mask[:, None, None]
                else:
                    xmask = (m_mask[:, None] & j_mask[None, :])[:, :, None]
                pair = tl.arange(0, 2)[None, None, :]
                xe, xo = tl.split(tl.load(x_ptr + row[:, :, None] + 2 * offs_j[None, :, None] + pair, mask=xmask,
                                          other=0.0))
                gi = offs_n.to(tl.int64) * (K // G) + k0 // G
                # Codes become floats through their bits, not an integer-to-float conversion (a quarter of the FMA
                # issue rate on sm_90; the H100 run of session 7 had two per byte and reached 24 % of the read
                # peak): a code q (0..15) in the low mantissa bits of a float whose ulp is 1 is exactly OFF + q;
                # fp32 2**23 (0x4B000000), 16-bit dots I4_OFF (launch_plan.int4_offset); OFF is then taken off.
                if FMA or DOT_DT == tl.float32:  # fp32 dots: fp32 activations, and bf16 ones under the interpreter
                    byte = tl.load(q_ptr + col * KH + offs_j[:, None], mask=j_mask[:, None] & n_mask[None, :],
                                   other=0).to(tl.int32)
                    lo = ((byte & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    if FMA:
                        part = tl.reduce(xe.to(tl.float32)[:, :, None] * lo[None, :, :]
                                         + xo.to(tl.float32)[:, :, None] * hi[None, :, :], 1, tl.standard._sum_combine)
                    else:
                        part = tl.dot(xe.to(DOT_DT), lo, input_precision="ieee")
                        part += tl.dot(xo.to(DOT_DT), hi, input_precision="ieee")
                    xsum = tl.reduce(xe.to(tl.float32) + xo.to(tl.float32), 1, tl.standard._sum_combine)
                    s = tl.load(s_ptr + gi, mask=n_mask, other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + gi, mask=n_mask, other=0.0).to(tl.float32)
                    acc += part * s[None, :] + xsum[:, None] * z[None, :]
                else:
                    # [BLOCK_N, BLOCK_K // 2]; unmasked when the tiles divide N and K (EVEN_NK): a masked load costs
                    # a select per register, about a tenth of this loop's instructions on sm_90.
                    qp = q_ptr + offs_n.to(tl.int64)[:, None] * KH + offs_j[None, :]
                    if GPC > 1:
                        # Chunks of GPC whole groups: the tile as [BLOCK_N, GPC, G / 2] bytes (an output's BLOCK_K / 2
                        # contiguous), each group's scale and zero one [BLOCK_N, GPC, 1] load, dequantized per
                        # group and reshaped to the dot's [BLOCK_N, BLOCK_K / 2] (see the one-row branch for why).
                        offs_jg = k0 // 2 + tl.arange(0, GPC)[:, None] * (G // 2) + tl.arange(0, G // 2)[None, :]
                        qp3 = q_ptr + offs_n.to(tl.int64)[:, None, None] * KH + offs_jg[None, :, :]
                        gi3 = (gi[:, None] + tl.arange(0, GPC)[None, :])[:, :, None]
                        if EVEN_NK:
                            byte = tl.load(qp3)
                            s16 = tl.load(s_ptr + gi3).to(DOT_DT)
                            z16 = tl.load(z_ptr + gi3).to(DOT_DT)
                        else:
                            g_mask = n_mask[:, None, None] & (k0 + tl.arange(0, GPC) * G < k_hi)[None, :, None]
                            byte = tl.load(qp3, mask=n_mask[:, None, None] & (offs_jg < k_hi // 2)[None, :, :], other=0)
                            s16 = tl.load(s_ptr + gi3, mask=g_mask, other=0.0).to(DOT_DT)
                            z16 = tl.load(z_ptr + gi3, mask=g_mask, other=0.0).to(DOT_DT)
                    elif s_ptr.dtype.element_ty == tl.int32:
                        # Config.scale_words: 16-bit scales and zeros as int32 words of two groups (K / G even), a
                        # 4-byte load per output that triton's pipeliner stages with the weight tile; it leaves
                        # loads under 4 bytes synchronous, a round trip after each chunk's copy (sm_90 SASS of the
                        # 8-row tile, session 11). This chunk's group is the word's low or high half.
                        wi = offs_n.to(tl.int64) * (K // G // 2) + k0 // (2 * G)
                        sh = ((k0 // G) % 2) * 16
                        if EVEN_NK:
                            byte = tl.load(qp)
                            sw = tl.load(s_ptr + wi)
                            zw = tl.load(z_ptr + wi)
                        else:
                            byte = tl.load(qp, mask=n_mask[:, None] & j_mask[None, :], other=0)
                            sw = tl.load(s_ptr + wi, mask=n_mask, other=0)
                            zw = tl.load(z_ptr + wi, mask=n_mask, other=0)
                        s16 = (sw >> sh).to(tl.int16).to(DOT_DT, bitcast=True)[:, None]
                        z16 = (zw >> sh).to(tl.int16).to(DOT_DT, bitcast=True)[:, None]
                    elif EVEN_NK:
                        byte = tl.load(qp)
                        s16 = tl.load(s_ptr + gi).to(DOT_DT)[:, None]
                        z16 = tl.load(z_ptr + gi).to(DOT_DT)[:, None]
                    else:
                        byte = tl.load(qp, mask=n_mask[:, None] & j_mask[None, :], other=0)
                        s16 = tl.load(s_ptr + gi, mask=n_mask, other=0.0).to(DOT_DT)[:, None]
                        z16 = tl.load(z_ptr + gi, mask=n_mask, other=0.0).to(DOT_DT)[:, None]
                    if len(I4_ASM) > 0:  # GPU only: two bytes into four 16-bit floats, 32-bit ops (launch_plan._INT4_ASM)
                        lo, hi = tl.inline_asm_elementwise(I4_ASM, "=r,=r,h", [byte],
                                                           dtype=(x_ptr.dtype.element_ty, x_ptr.dtype.element_ty),
                                                           is_pure=True, pack=2)
                    else:
                        byte = byte.to(tl.int32)
                        lo = ((byte & 15) | I4_BITS).to(tl.int16).to(DOT_DT, bitcast=True)
                        hi = ((byte >> 4) | I4_BITS).to(tl.int16).to(DOT_DT, bitcast=True)
                    wlo = (lo - I4_OFF) * s16 + z16  # OFF + q - OFF is exact
                    whi = (hi - I4_OFF) * s16 + z16
                    if GPC > 1:
                        wlo = tl.reshape(wlo, (BLOCK_N, BLOCK_K // 2))
                        whi = tl.reshape(whi, (BLOCK_N, BLOCK_K // 2))
                    acc_t += tl.dot(wlo, tl.trans(xe.to(DOT_DT)), input_precision="ieee")
                    acc_t += tl.dot(whi, tl.trans(xo.to(DOT_DT)), input_precision="ieee")
        if not FMA and DOT_DT != tl.float32:
            acc += tl.trans(acc_t)
    else:
        # MX: the scale changes every G elements of K, so it is applied to the weight tile before the dot
        # (rounded to the activation dtype, as ops.dequantize does), not to the accumulator.
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            wmask = k_mask[:, None] & n_mask[None, :]
            x = tl.load(x_ptr + row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(q_ptr + col * K + offs_k[:, None], mask=wmask, other=0.0).to(tl.float32)
            e = tl.load(s_ptr + col * (K // G) + offs_k[:, None] // G, mask=wmask, other=0).to(tl.int32)
            # 2**e from its fp32 bits (exact; tl.exp2 is an approximate ex2 on the GPU). e = -127 (quantize's
            # floor, reached by all-zero blocks and those below ~2**-119) is the fp32 subnormal 2**-127.
            p = tl.where(e > -127, (e + 127) << 23, 4194304).to(tl.float32, bitcast=True)
            w = (w * p).to(x_ptr.dtype.element_ty)
            if FMA:
                acc += tl.reduce(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], 1,
                                 tl.standard._sum_combine)
            else:
                acc += tl.dot(x.to(DOT_DT), w.to(DOT_DT), input_precision="ieee")
    if HAS_LORA:
        # EoRA: acc += u B^T with u = x A^T [M, RANK] (computed before the launch) and B [N, RANK], after
        # the row scale (it belongs to the output, not to the codes). Unsplit launches only (launch() starts a
        # split-K output at the term). BLOCK_R >= 16 (tl.dot's minimum) is masked.
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < RANK
            u = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * RANK + offs_r[None, :],
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            lb = tl.load(lb_ptr + col * RANK + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if FMA:
                acc += tl.reduce(u.to(tl.float32)[:, :, None] * lb.to(tl.float32)[None, :, :], 1,
                                 tl.standard._sum_combine)
            else:
                acc += tl.dot(u.to(DOT_DT), lb.to(DOT_DT), input_precision="ieee")
    if HAS_BIAS:
        first = (offs_n * 0 + k_lo) == 0  # a tensor: the interpreter refuses a scalar bool in a mask
        b = tl.load(b_ptr + offs_n, mask=n_mask & first, other=0.0).to(tl.float32)  # added by split 0 only
        acc += b[None, :]
    # Split-K sums, then the store, as it is or gated (EPILOGUE 1: silu(gate) * up, fuse_gated_activation.py)
    _epilogue.finish(acc, out_ptr, ws_ptr, cnt_ptr, pid_m, pid_n, offs_m, offs_n, m_mask,
                     n_mask, N, SPLITS, SPLIT, EPILOGUE, BLOCK_M, BLOCK_N)


def low_rank(x, lora_a, lora_b) -> torch.Tensor:
    """(x A^T) B^T as the unfused EoRA side path computes it: two torch linears in x's dtype."""
    return F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


def reference(x, qweight, scales, zeros, bias, fmt: str, group_size: int, act: str = "none",
              lora_a=None, lora_b=None) -> torch.Tensor:
    """Eager reference: quantize-dequantize the activations (act), dequantize the weight to the activation
    dtype, then F.linear (the IR op's definition); plus the low-rank term on the unquantized x, if given."""
    out = qops.reference(x, qweight, scales, zeros, bias, fmt, group_size, act)
    return out if lora_a is None else out + low_rank(x, lora_a, lora_b)


def lora_unfusable(fmt: str, act: str = "none") -> str | None:
    """None when the kernel adds a low-rank term for this pairing, else why not (lowering keeps the side
    path as torch ops then): W8A8 runs act_quant's int8 x int8 kernel, which has no low-rank epilogue."""
    if act == "int8" and fmt == "int8":
        return "the W8A8 int8 x int8 kernel has no low-rank term"
    return None


def format_unsupported(fmt: str, act: str = "none") -> str | None:
    """None when a kernel exists for this weight format / activation pairing, else why not."""
    if fmt not in _FMT:
        return f"no Triton kernel for weight format {fmt!r} yet (eager dequantize + matmul)"
    if act not in qops.ACTIVATIONS or fmt not in qops.ACTIVATIONS[act]:
        return f"no Triton kernel for activations={act!r} with weights {fmt!r} (eager path)"
    return None


def supported(x: torch.Tensor, qweight: torch.Tensor, fmt: str, group_size: int, act: str = "none",
              lora: bool = False) -> str | None:
    """None when the kernels take these inputs, else why not (the caller runs the eager path)."""
    if why := format_unsupported(fmt, act) or (lora and lora_unfusable(fmt, act)):
        return why
    if x.dtype not in qops.FLOAT_DTYPES:
        return f"activation dtype {x.dtype} is not fp32/fp16/bf16"
    k = x.shape[-1]
    if fmt == "int4" and (k % group_size or k % 2 or group_size % 2):
        return f"K={k} does not split into groups of {group_size}"
    if _FMT[fmt] == 2 and (group_size <= 0 or k % group_size):
        return f"K={k} does not split into MX blocks of {group_size}"
    if fmt in _FP8_FORMATS and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        return "Triton loads e4m3 (float8e4nv) only on sm_89 and newer GPUs"
    return None


def kind_for(rows: int | None, fmt: str = "int8", act: str = "none") -> str:
    """The kernel a call with ``rows`` activation rows runs (None = not known until run time)."""
    if fmt not in _FMT or act not in qops.ACTIVATIONS or fmt not in qops.ACTIVATIONS[act]:
        return "eager (no Triton kernel for this format)"
    shape = "gemv" if rows is not None and rows <= GEMV_MAX_M else "gemm"
    if act == "none":
        return "dequant-" + shape
    if act == "int8" and fmt == "int8":
        return "w8a8-" + shape  # int8 x int8 -> int32 tensor-core GEMM after a row-quantize kernel
    # Other activation modes: the row-quantize kernel writes the quantize-dequantized activations, then the
    # weight-only kernel runs on them (the reference's numerics; not an fp8 x fp8 / MX integer GEMM).
    return f"{act}-fake-quant+dequant-" + shape


def _lora_inputs(x2, lora_a, lora_b, n: int):
    """(u = x A^T [M, r] contiguous, B [N, r] contiguous, BLOCK_R) for the kernel's low-rank term.

    u is a plain torch matmul before the launch: it is tiny ([M, r], r << N), and computing it in the
    kernel would redo the full-K product x A^T in every N tile (and split it across the K splits)."""
    k, r = x2.shape[1], lora_a.shape[0]
    if lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(f"low-rank factors A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit K={k}, N={n}")
    u = F.linear(x2, lora_a.to(device=x2.device, dtype=x2.dtype)).contiguous()  # rounded like the side path's
    lb = lora_b.to(device=x2.device, dtype=x2.dtype).contiguous()
    return u, lb, max(16, min(triton.next_power_of_2(r), 64))


def launch(x, qweight, scales, zeros, bias, fmt: str, group_size: int, split_k: int | None = None,
           config: plan.Config | None = None, act: str = "none", lora_a=None, lora_b=None,
           epilogue: str = "none") -> torch.Tensor:
    """Run the kernels on x [..., K]; the result is [..., N] in x's dtype. split_k forces the K split (tests);
    config overrides the tile shape (benchmarks/kernels.py --sweep); act quantizes the activations per token
    first (W8A8 for int8 x int8). lora_a [r, K] / lora_b [N, r]: add (x A^T) B^T in the kernel, with x the
    unquantized activations (the EoRA side path reads x, not its fake-quantized copy). epilogue (compiler/ops.py
    EPILOGUES): "silu_mul" gives [..., N / 2], in the kernel's store where it can (not W8A8's kernel, not a
    split-K low-rank launch, whose sums finish in an fp32 output: there torch ops follow)."""
    lora = lora_a is not None and lora_a.shape[0] > 0
    if lora and (why := lora_unfusable(fmt, act)):
        raise ValueError(why)
    k, n = x.shape[-1], qweight.shape[0]
    if epilogue not in qops.EPILOGUES or (epilogue != "none" and n % 2):
        raise ValueError(f"epilogue={epilogue!r} with N={n}: the epilogues are {qops.EPILOGUES}, on an even N")
    if act == "int8" and fmt == "int8":
        return qops.apply_epilogue(aq.w8a8(x, qweight, scales, bias, split_k, config), epilogue)
    dev = x.device
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if not (m and n):
        return torch.empty((*x.shape[:-1], n // (2 if epilogue != "none" else 1)), dtype=x.dtype, device=dev)
    q, s = _ops.on_device(qweight, dev, f"{NAME} weight"), _ops.on_device(scales, dev, f"{NAME} scales")
    u, lb, block_r = _lora_inputs(x2, lora_a, lora_b, n) if lora else (s, s, 16)  # placeholders when unused
    if act != "none":
        x2 = aq.quantize_rows(x2, act, fake=True)[0]
    z = _ops.on_device(zeros, dev, f"{NAME} zeros") if zeros is not None else s  # placeholder: int4 reads it
    b = _ops.on_device(bias, dev, f"{NAME} bias") if bias is not None else s
    interp = _ops.interpreting(dev)
    if config is None and m <= GEMV_MAX_M:
        config = plan.tuned("dequant", fmt, m, x.dtype, dev, (n, k))
    bm, bn, bk, warps, stages, splits = plan.matmul_tiles(m, fmt, x.dtype, config)
    words = fmt == "int4" and plan.uses_fma(m, config) and bm == 1  # the one-row branch: codes as int32 words
    # Whole groups per K chunk (group sizes are powers of two, ops.FORMATS): the one-row branch and 16-bit dot
    # tiles dequantize per group in registers; fp32 dots and several-row fma tiles scale a chunk's partial sum,
    # so their chunks stay inside one group. Only a given config (a tuning table's, the sweep's) spans groups:
    # the built-in tiles stay what was measured, one group a chunk.
    dot16 = fmt == "int4" and not plan.uses_fma(m, config) and plan.dot_dtype(x.dtype, interp) != tl.float32
    gpc = 1
    if (words or dot16) and bk > group_size and config is not None:
        gpc = bk // group_size
        if dot16 and config.scale_words:  # before session 22 the sweep asked this and silently got plain scales
            raise ValueError(f"Config.scale_words reads one group's scales per chunk, but block_k={bk} spans {gpc} "
                             f"groups of {group_size}: use block_k <= {group_size} or scale_words=False")
    elif fmt == "int4":
        bk = min(bk, group_size)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ks = plan.k_split(tiles, k, bk, dev, split_k if split_k is not None else splits)
    atomic = ks < k
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), triton.cdiv(k, ks))
    ws = cnt = s  # placeholders when unused
    in_kernel = epilogue != "none" and not (atomic and lora)  # the epilogue in the kernel's single store
    width = n // 2 if in_kernel else n
    if atomic and lora:
        # With EoRA the split-K sums go into a float32 output that starts at the low-rank term (one small matmul
        # where a zero fill would be). In the kernel, split 0's low-rank loop made illegal memory accesses on an
        # H100 (torch 2.11 / triton 3.6, int4 g32 decode tiles; int8 was fine), so split-K keeps it outside.
        split, out = plan.SPLIT_FP32_OUT, torch.mm(u.float(), lb.float().t())
    elif atomic:
        split, out = plan.SPLIT_FIXUP, torch.empty((m, width), dtype=x.dtype, device=dev)
        ws, cnt = plan.split_workspace(m, n, grid[0] * grid[1], dev)
    else:
        split, out = plan.SPLIT_NONE, torch.empty((m, width), dtype=x.dtype, device=dev)
    dot_dt = plan.dot_dtype(x.dtype, interp)
    i4_bits, i4_off = plan.int4_offset(dot_dt)
    fma = plan.uses_fma(m, config)
    # One-row int4 fma configs with stages >= 2 double-buffer their loads in registers (the kernel's PREFETCH).
    prefetch = words and stages >= 2
    if words:
        q = q.contiguous().view(torch.int32)  # the one-row fma branch reads 8 codes per word (K % 32 == 0)
    if config is not None and config.scale_words and fmt == "int4" and not fma and dot_dt != tl.float32 and gpc == 1 \
            and (k // group_size) % 2 == 0 and s.dtype == z.dtype and s.element_size() == 2:
        s, z = s.contiguous().view(torch.int32), z.contiguous().view(torch.int32)  # the kernel reads words
    _ops.jit_variant(_matmul_kernel, interp)[grid](
        x2, q, s, z, b, u, lb, out, ws, cnt, m, n, k, ks, grid[2], lora_a.shape[0] if lora else 0, FMT=_FMT[fmt],
        G=max(group_size, 1), HAS_BIAS=bias is not None, HAS_LORA=lora and not atomic, DOT_DT=dot_dt,
        I4_BITS=i4_bits, I4_OFF=i4_off, I4_ASM=plan.int4_asm(dot_dt, interp),
        EVEN_NK=n % bn == 0 and k % bk == 0 and ks % bk == 0, GPC=gpc, EPILOGUE=int(in_kernel),
        SPLIT=split, FMA=fma, PREFETCH=prefetch, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r,
        num_warps=warps, num_stages=1 if prefetch else stages,
        # The one-row int4 loop of several groups a chunk reads bf16 x two values a load (int4_rows._x_of_chunk).
        X_PAIRS=words and gpc > 1 and x2.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0,
        **_ops.launch_options(dev))
    out = out.to(x.dtype).view(*x.shape[:-1], width)
    return out if in_kernel else qops.apply_epilogue(out, epilogue)


def run(x, qweight, scales, zeros, bias, fmt: str, group_size: int, act: str = "none", mode: int = 0,
        lora_a=None, lora_b=None, epilogue: str = "none") -> torch.Tensor:
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton), 1: Triton, 2: the IR op's eager/CPU path (then
    the low-rank term is the side path's own two linears + add, as in the unfused graph)."""
    lora = lora_a is not None
    if _ops.use_triton(mode, x.device) and supported(x, qweight, fmt, group_size, act, lora) is None:
        out, path = launch(x, qweight, scales, zeros, bias, fmt, group_size, act=act, lora_a=lora_a,
                           lora_b=lora_b, epilogue=epilogue), "triton"
    else:
        out, path = qops.wq_linear_eager(x, qweight, scales, zeros, bias, fmt, group_size, act), "torch"
        if lora:
            out = out + low_rank(x, lora_a, lora_b)
        out = qops.apply_epilogue(out, epilogue)
    _ops.count(NAME, path)
    return out


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, group_size: int, act: str, mode: int,
           lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
           epilogue: str = "none") -> torch.Tensor:
        # lora_a / lora_b (EoRA's A [r, K], B [N, r]) and epilogue come last with defaults: older callers pass none.
        return run(x, qweight, scales, zeros, bias, fmt, group_size, act, mode, lora_a, lora_b, epilogue)

    @op.register_fake
    def _fake(x, qweight, scales, zeros, bias, fmt, group_size, act, mode, lora_a=None, lora_b=None, epilogue="none"):
        return x.new_empty((*x.shape[:-1], qweight.shape[0] // (1 if epilogue == "none" else 2)))
