"""Generate the source of one fused row kernel: @triton.jit kernel, launcher, eager reference, custom op."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.codegen.partition import FusionGroup
from effcompile.compiler.ir import tensor_val

_TL = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
_TORCH = {torch.float32: "torch.float32", torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}
# The interpreter can only run tl builtins and tl.reduce with triton's own combine functions when
# triton was imported without TRITON_INTERPRET: jit helpers like tl.sum/tl.max/tl.sigmoid were
# decorated at that import. So the kernel uses builtins and _SUM/_MAX below, never those helpers.
_SIG = "(1.0 / (1.0 + tl.exp(-({a}))))"
_SUM = "tl.reduce({x}, 0, tl.standard._sum_combine)"
_MAX = "tl.reduce({x}, 0, tl.standard._elementwise_max)"
_UNARY_TL = {
    "relu": "tl.maximum({a}, 0.0)",
    "sigmoid": _SIG,
    "exp": "tl.exp({a})",
    "rsqrt": "tl.rsqrt({a})",
    "sqrt": "tl.sqrt({a})",
    "erf": "tl.erf({a})",
    "abs": "tl.abs({a})",
    "neg": "(-{a})",
    "square": "({a} * {a})",
    "silu": "({a} * " + _SIG + ")",
    # tanh via sigmoid: tl has no tanh on every triton version, and this form saturates cleanly.
    "tanh": "(2.0 * " + _SIG.format(a="2.0 * {a}") + " - 1.0)",
    "gelu": "(0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476)))",
    "gelu_tanh": "(0.5 * {a} * (1.0 + (2.0 * "
    + _SIG.format(a="1.5957691216057308 * ({a} + 0.044715 * {a} * {a} * {a})")
    + " - 1.0)))",
}
_UNARY_REF = {
    "relu": "torch.relu({a})",
    "sigmoid": "torch.sigmoid({a})",
    "exp": "torch.exp({a})",
    "rsqrt": "torch.rsqrt({a})",
    "sqrt": "torch.sqrt({a})",
    "erf": "torch.erf({a})",
    "abs": "torch.abs({a})",
    "neg": "(-{a})",
    "square": "torch.square({a})",
    "silu": "F.silu({a})",
    "tanh": "torch.tanh({a})",
    "gelu": "F.gelu({a})",
    "gelu_tanh": "F.gelu({a}, approximate='tanh')",
}
_POW_TL = {
    1: "{a}",
    2: "({a} * {a})",
    3: "({a} * {a} * {a})",
    0.5: "tl.sqrt({a})",
    -0.5: "tl.rsqrt({a})",
    -1: "(1.0 / {a})",
    -2: "(1.0 / ({a} * {a}))",
}
_BIN = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class GeneratedKernel:
    name: str
    kind: str
    source: str
    ops: tuple[str, ...]
    inputs: tuple[fx.Node, ...]  # graph nodes to pass, in op argument order
    outputs: tuple[fx.Node, ...]  # graph nodes the op's results replace, in order


def _lit(c, *, for_triton: bool) -> str:
    if c is None:
        return "None"
    if isinstance(c, float) and not math.isfinite(c):
        return f'float("{c}")'
    return repr(float(c)) if for_triton else repr(c)


def _program(group: FusionGroup) -> tuple[list[str], dict, list[tuple[str, str]]]:
    """Canonical text of the group (hashed for the name) plus refs for each node and the output list."""
    ref = {node: f"in{i}" for i, (node, _) in enumerate(group.inputs)}
    lines = [f"in{i} {cls}" for i, (_, cls) in enumerate(group.inputs)]
    for j, node in enumerate(group.nodes):
        spec = group.specs[node]
        args = ",".join(ref[a] if isinstance(a, fx.Node) else _lit(a, for_triton=False) for a in spec.args)
        extra = ""
        if spec.op == "cast":
            extra = f" -> {tensor_val(node).dtype}"
        rowscalar = tensor_val(node).shape[-1] == 1 and group.n != 1
        lines.append(f"v{j} = {spec.op}({args}) {spec.params!r}{extra}{' rowscalar' if rowscalar else ''}")
        ref[node] = f"v{j}"
    outs = []
    for node in group.outputs:
        val = tensor_val(node)
        kind = "rowscalar" if val.shape[-1] == 1 and group.n != 1 else "full"
        lines.append(f"out {ref[node]} {val.dtype} {kind}")
        outs.append((ref[node], kind))
    return lines, ref, outs


def _triton_lines(group: FusionGroup, ref: dict) -> list[str]:
    body = []
    for node in group.nodes:
        spec, v = group.specs[node], ref[node]
        a = [ref[x] if isinstance(x, fx.Node) else _lit(x, for_triton=True) for x in spec.args]
        op = spec.op
        params = dict(spec.params)
        if op in _BIN:
            body.append(f"{v} = {a[0]} {_BIN[op]} {a[1]}")
        elif op in _UNARY_TL:
            body.append(f"{v} = " + _UNARY_TL[op].format(a=a[0]))
        elif op == "pow":
            body.append(f"{v} = " + _POW_TL[params["exponent"]].format(a=a[0]))
        elif op == "cast":
            body.append(f"{v} = {a[0]}")
        elif op == "rotate_half":
            # cat(-x[h:], x[:h]): each lane reads x's other half from memory (a register tile cannot be
            # permuted), so x must be a full-row input of the group; partition's convexity keeps it one.
            x = a[0]
            if not x.startswith("in"):
                raise NotImplementedError("rotate_half of a value computed inside the kernel")
            body += [
                f"{v} = tl.load({x}_ptr + (row // {x}_in) * {x}_so + (row % {x}_in) * {x}_si + (offs + N // 2) % N,"
                " mask=mask, other=0.0).to(tl.float32)",
                f"{v} = tl.where(offs < N // 2, -{v}, {v})",
            ]
        elif op in ("sum", "mean"):
            # Masked lanes hold other=0 loads pushed through the chain; reset them to the sum identity.
            body.append(
                f"{v} = " + _SUM.format(x=f"tl.where(mask, {a[0]}, 0.0)") + (" / N" if op == "mean" else "")
            )
        elif op == "amax":
            body.append(f"{v} = " + _MAX.format(x=f'tl.where(mask, {a[0]}, float("-inf"))'))
        elif op == "softmax":
            body += [
                f"{v}_m = " + _MAX.format(x=f'tl.where(mask, {a[0]}, float("-inf"))'),
                f"{v}_e = tl.where(mask, tl.exp({a[0]} - {v}_m), 0.0)",
                f"{v} = {v}_e / " + _SUM.format(x=f"{v}_e"),
            ]
        elif op == "layer_norm":
            body += [
                f"{v}_mu = " + _SUM.format(x=f"tl.where(mask, {a[0]}, 0.0)") + " / N",
                f"{v}_d = tl.where(mask, {a[0]} - {v}_mu, 0.0)",
                f"{v} = {v}_d * tl.rsqrt(" + _SUM.format(x=f"{v}_d * {v}_d") + f" / N + {params['eps']!r})",
            ]
            body += [f"{v} = {v} * {a[1]}"] if a[1] != "None" else []
            body += [f"{v} = {v} + {a[2]}"] if a[2] != "None" else []
        elif op == "rms_norm":
            ms = _SUM.format(x=f"tl.where(mask, {a[0]} * {a[0]}, 0.0)")
            body.append(f"{v} = {a[0]} * tl.rsqrt({ms} / N + {params['eps']!r})")
            body += [f"{v} = {v} * {a[1]}"] if a[1] != "None" else []
        else:
            raise NotImplementedError(op)
        dt = tensor_val(node).dtype
        if dt != torch.float32:
            # Eager rounds every fp16/bf16 result; do the same so later math sees the same values.
            body.append(f"{v} = {v}.to({_TL[dt]}).to(tl.float32)")
    return body


def _ref_lines(group: FusionGroup, ref: dict) -> list[str]:
    body = []
    for node in group.nodes:
        spec, v = group.specs[node], ref[node]
        a = [ref[x] if isinstance(x, fx.Node) else _lit(x, for_triton=False) for x in spec.args]
        op, params = spec.op, dict(spec.params)
        if op in _BIN:
            body.append(f"{v} = {a[0]} {_BIN[op]} {a[1]}")
        elif op in _UNARY_REF:
            body.append(f"{v} = " + _UNARY_REF[op].format(a=a[0]))
        elif op == "pow":
            body.append(f"{v} = {a[0]} ** {params['exponent']!r}")
        elif op == "cast":
            body.append(f"{v} = {a[0]}.to({_TORCH[tensor_val(node).dtype]})")
        elif op == "rotate_half":
            body.append(f"{v} = torch.cat((-{a[0]}[..., {a[0]}.shape[-1] // 2:], {a[0]}[..., :{a[0]}.shape[-1] // 2]), -1)")
        elif op in ("sum", "mean", "amax"):
            body.append(f"{v} = {a[0]}.{op}(-1, keepdim=True)")
        elif op == "softmax":
            dt = params.get("dtype")
            body.append(
                f"{v} = torch.softmax({a[0]}, -1" + (f", dtype={_TORCH[dt]})" if dt is not None else ")")
            )
        elif op == "layer_norm":
            body.append(f"{v} = F.layer_norm({a[0]}, ({a[0]}.shape[-1],), {a[1]}, {a[2]}, {params['eps']!r})")
        elif op == "rms_norm":
            body.append(f"{v} = torch.rms_norm({a[0]}, ({a[0]}.shape[-1],), {a[1]}, {params['eps']!r})")
        else:
            raise NotImplementedError(op)
    return body


def generate(group: FusionGroup) -> GeneratedKernel:
    """Source for one group; the name is kind + a hash of the canonical program, so equal groups share it."""
    lines, ref, outs = _program(group)
    digest = hashlib.sha256((group.kind + "\n" + "\n".join(lines)).encode()).hexdigest()[:10]
    name = f"{group.kind}_{digest}"
    ops = tuple(group.specs[n].op for n in group.nodes)
    ins = [f"in{i}" for i in range(len(group.inputs))]
    classes = [c for _, c in group.inputs]
    out_dtypes = [tensor_val(n).dtype for n in group.outputs]
    full = ins[classes.index("full")]
    ptrs = [f"{x}_ptr" for x in ins] + [f"out{k}_ptr" for k in range(len(outs))]

    strides = [f"{x}_{w}" for x, cls in zip(ins, classes, strict=True) if cls == "full" for w in ("in", "si", "so")]
    k = [
        "@triton.jit",
        f"def _kernel({', '.join(ptrs)}, N, {', '.join(strides)}, BLOCK_N: tl.constexpr, PDL: tl.constexpr):",
        "    _ops.wait_for_producers(PDL)  # first: with PDL, nothing may read another kernel's output before it",
        "    # One program per row; int64 row offsets so M * N may exceed 2**31.",
        "    row = tl.program_id(0).to(tl.int64)",
        "    offs = tl.arange(0, BLOCK_N)",
        "    mask = offs < N",
    ]
    for x, cls in zip(ins, classes, strict=True):
        where = {
            # full rows may be strided views: ops.row_layout
            "full": f"{x}_ptr + (row // {x}_in) * {x}_so + (row % {x}_in) * {x}_si + offs, mask=mask, other=0.0",
            "row": f"{x}_ptr + offs, mask=mask, other=0.0",
            "scalar": f"{x}_ptr",
            "rowscalar": f"{x}_ptr + row",
        }[cls]
        k.append(f"    {x} = tl.load({where}).to(tl.float32)")
    k += ["    " + s for s in _triton_lines(group, ref)]
    for i, ((v, kind), dt) in enumerate(zip(outs, out_dtypes, strict=True)):
        if kind == "full":
            k.append(f"    tl.store(out{i}_ptr + row * N + offs, {v}.to({_TL[dt]}), mask=mask)")
        else:
            k.append(f"    tl.store(out{i}_ptr + row, {v}.to({_TL[dt]}))")

    sig = ", ".join(f"{x}: torch.Tensor" for x in ins)
    ret = "torch.Tensor" if len(outs) == 1 else f"tuple[{', '.join(['torch.Tensor'] * len(outs))}]"
    out_shapes = ", ".join(
        f"({full}.shape{'' if kd == 'full' else '[:-1] + (1,)'}, {_TORCH[dt]})"
        for (_, kd), dt in zip(outs, out_dtypes, strict=True)
    )
    ref_ret = ", ".join(v for v, _ in outs)
    src = f'''"""Generated by effcompile.codegen ({group.kind}: {", ".join(ops)}). Do not edit: regenerated from the graph."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from effcompile.codegen import ops as _ops

NAME = {name!r}
KIND = {group.kind!r}
OPS = {ops!r}
INPUT_CLASSES = {tuple(classes)!r}
_OUTPUTS = lambda {full}: ({out_shapes},)


{chr(10).join(k)}


def launch({", ".join(ins)}):
    """Run the Triton kernel, one program per row of N: full-row inputs read in place when their rows are
    evenly spaced (a slice of a wider row, or a head view of one: ops.row_layout), every other input
    flattened contiguous."""
    N = {full}.shape[-1]
    M = {full}.numel() // max(N, 1)
    dev = {full}.device
    args, strides = [], []
    for t, cls in zip(({", ".join(ins)},), INPUT_CLASSES):
        t = t.to(dev)
        rows = _ops.row_layout(t) if cls == "full" else None
        if cls == "full" and rows is None:
            t, rows = t.contiguous(), (1, 0, N)
        args.append(t if cls == "full" else t.contiguous().view(-1))
        strides += list(rows) if cls == "full" else []
    outs = [torch.empty(s, dtype=d, device=dev) for s, d in _OUTPUTS({full})]
    if M > 0 and N > 0:
        block = triton.next_power_of_2(N)
        _ops.jit_variant(_kernel, _ops.interpreting(dev))[(M,)](*args, *outs, N, *strides, BLOCK_N=block,
                                                             num_warps=min(max(block // 256, 1), 16),
                                                             **_ops.launch_options(dev))
    return tuple(outs)


def reference({", ".join(ins)}):
    """Eager reference: the original graph ops in their original dtypes."""
{chr(10).join("    " + s for s in _ref_lines(group, ref))}
    return ({ref_ret},)


def run({", ".join(ins)}, mode: int = 0):
    """mode 0: auto (CUDA or TRITON_INTERPRET=1 -> Triton), 1: Triton, 2: eager reference."""
    inputs = ({", ".join(ins)},)
    if _ops.use_triton(mode, {full}.device):
        outs, path = launch(*inputs), "triton"
    else:
        outs, path = reference(*inputs), "torch"
    _ops.count(NAME, path)
    return _ops.no_alias(outs, inputs)


if not _ops.op_exists(NAME):

    @torch.library.custom_op("effcompile::" + NAME, mutates_args=())
    def op({sig}, mode: int) -> {ret}:
        outs = run({", ".join(ins)}, mode)
        return outs{"[0]" if len(outs) == 1 else ""}

    @op.register_fake
    def _fake({", ".join(ins)}, mode):
        outs = tuple(torch.empty(s, dtype=d, device={full}.device) for s, d in _OUTPUTS({full}))
        return outs{"[0]" if len(outs) == 1 else ""}
'''
    return GeneratedKernel(
        name, group.kind, src, ops, tuple(n for n, _ in group.inputs), tuple(group.outputs)
    )
