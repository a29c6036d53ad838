"""Find fusion groups: connected, cycle-free sets of row-wise ops (elementwise + last-dim reductions)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from effcompile.codegen.ops import row_layout
from effcompile.compiler.ir import TAG, tensor_val

MAX_BLOCK = 16384  # one row must fit one program's registers; wider rows need a split reduction
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPILOGUE = "ec_epilogue"  # meta key marking a bias add split off a linear
REDUCTIONS = ("mean", "sum", "amax", "layer_norm", "rms_norm", "softmax")
ROW_REDUCTIONS = ("mean", "sum", "amax")  # produce one value per row ([..., 1])

_BINARY = {
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    "add": "add",
    "sub": "sub",
    "mul": "mul",
    "div": "div",
}
_UNARY = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.exp: "exp",
    torch.rsqrt: "rsqrt",
    torch.sqrt: "sqrt",
    torch.erf: "erf",
    torch.abs: "abs",
    operator.neg: "neg",
    torch.neg: "neg",
    F.silu: "silu",
    torch.square: "square",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "exp": "exp",
    "rsqrt": "rsqrt",
    "sqrt": "sqrt",
    "erf": "erf",
    "abs": "abs",
    "neg": "neg",
    "square": "square",
}
_POW = {operator.pow, torch.pow, "pow"}
_CASTS = {"to", "float", "half", "bfloat16", "type"}
_POW_EXPONENTS = (-2, -1, -0.5, 0.5, 1, 2, 3)  # exponents with an exact fp32 formula in the kernel


@dataclass(frozen=True)
class OpSpec:
    """One fusible node in canonical form: op name, data args (nodes, numbers or None), params."""

    op: str
    args: tuple
    params: tuple = ()


@dataclass
class FusionGroup:
    nodes: list[fx.Node]  # in graph order
    specs: dict[fx.Node, OpSpec]
    inputs: list[tuple[fx.Node, str]]  # (producer, "full" | "row" | "scalar" | "rowscalar")
    outputs: list[fx.Node]
    n: int  # row length N
    kind: str  # "pointwise" | "reduction" | "epilogue"


@dataclass
class Partition:
    groups: list[FusionGroup] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    # The slices and negation a fused rotate_half replaces: lower() erases those left without users.
    rotate_half_parts: list[fx.Node] = field(default_factory=list)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_last_dim(dim, ndim: int) -> bool:
    if isinstance(dim, list | tuple):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _bad_kwargs(node: fx.Node, allowed: set[str]) -> bool:
    return any(k not in allowed for k in node.kwargs)


def _half_of(node) -> tuple[fx.Node, slice] | None:
    """(x, the slice) when node is x[..., start:stop], else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    x, idx = node.args
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)):
        return None
    return x, idx[1]


def rotate_half_parts(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, [low slice, high slice, its negation]) when node is cat((-x[..., h:], x[..., :h]), -1), 2h = x's
    last dim.

    That is Llama's (and most RoPE models') rotate_half. As one row op it joins the RoPE multiply-add
    (q cos + rotate_half(q) sin): one kernel instead of a neg kernel, a cat and a multiply-add kernel."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    parts, out = _arg(node, 0, "tensors"), tensor_val(node)
    if out is None or not isinstance(parts, list | tuple) or len(parts) != 2:
        return None
    if not _is_last_dim(_arg(node, 1, "dim", 0), out.dim()):
        return None
    neg, lo = parts
    if not (isinstance(neg, fx.Node) and neg.op == "call_function" and neg.target in (operator.neg, torch.neg)
            and len(neg.args) == 1 and not neg.kwargs):
        return None
    hi_s, lo_s = _half_of(neg.args[0]), _half_of(lo)
    if hi_s is None or lo_s is None or hi_s[0] is not lo_s[0]:
        return None
    x = hi_s[0]
    n = getattr(tensor_val(x), "shape", [None])[-1]
    if not isinstance(n, int) or n % 2:
        return None
    # slice.indices: the (start, stop, step) a slice means on a dim of n (None, negative and large bounds).
    try:
        if hi_s[1].indices(n) != (n // 2, n, 1) or lo_s[1].indices(n) != (0, n // 2, 1):
            return None
    except TypeError:  # a symbolic bound (dynamic shapes)
        return None
    return x, [lo, neg.args[0], neg]  # producers before consumers


def op_spec(node: fx.Node) -> OpSpec | str | None:
    """Canonical op of a node; a reason string when it is a row op we refuse; None when not a row op."""
    if node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    x = node.args[0] if node.args else None
    xv = tensor_val(x)
    try:
        if t is torch.cat:
            rot = rotate_half_parts(node)
            return OpSpec("rotate_half", (rot[0],)) if rot else None
        if t in _BINARY:
            if _bad_kwargs(node, set()) or len(node.args) != 2:
                return "unsupported arguments (alpha/rounding_mode/out)"
            return OpSpec(_BINARY[t], tuple(node.args[:2]))
        if t in _UNARY or t in (F.gelu,):
            inplace = node.kwargs.get("inplace", False) or (
                len(node.args) > 1 and t in (F.relu, F.silu) and node.args[1]
            )
            if inplace:
                return "in-place op"
            if t is F.gelu or t == "gelu":
                approx = _arg(node, 1, "approximate", "none")
                if approx not in ("none", "tanh"):
                    return f"gelu approximate={approx!r}"
                return OpSpec("gelu_tanh" if approx == "tanh" else "gelu", (x,))
            if _bad_kwargs(node, {"inplace"}) or len(node.args) > (2 if t in (F.relu, F.silu) else 1):
                return "unsupported arguments"
            return OpSpec(_UNARY[t], (x,))
        if t in _POW:
            e = _arg(node, 1, "exponent")
            if not isinstance(x, fx.Node) or isinstance(e, fx.Node) or e not in _POW_EXPONENTS:
                return f"pow exponent {e!r} not supported"
            return OpSpec("pow", (x,), (("exponent", e),))
        if node.op == "call_method" and t in _CASTS or t == "gelu":
            if t == "gelu":
                return OpSpec("gelu", (x,))
            out = tensor_val(node)
            if _bad_kwargs(node, {"dtype", "device", "non_blocking", "copy"}):
                return f"cast with kwargs {sorted(node.kwargs)}"
            if xv is None or out is None or out.device != xv.device:
                return "cast that moves devices"
            return OpSpec("cast", (x,))
        if t in ("mean", "sum", "amax", torch.mean, torch.sum, torch.amax):
            name = t if isinstance(t, str) else t.__name__
            dim = _arg(node, 1, "dim")
            keepdim = _arg(node, 2, "keepdim", False)
            if xv is None or not _is_last_dim(dim, xv.dim()):
                return f"{name} over a dim other than the last"
            if not keepdim:
                return f"{name} without keepdim"
            if _bad_kwargs(node, {"dim", "keepdim"}) or len(node.args) > 3:
                return f"{name} with dtype/out"
            return OpSpec(name, (x,))
        if t in (torch.softmax, F.softmax, "softmax"):
            dim = _arg(node, 1, "dim")
            if xv is None or not _is_last_dim(dim, xv.dim()):
                return "softmax over a dim other than the last"
            dtype = node.kwargs.get(
                "dtype", node.args[2] if len(node.args) > 2 and t is torch.softmax else None
            )
            return OpSpec("softmax", (x,), (("dtype", dtype),))
        if t in (F.layer_norm, torch.layer_norm, torch.rms_norm, F.rms_norm):
            shape = _arg(node, 1, "normalized_shape")
            w = _arg(node, 2, "weight")
            if t in (torch.rms_norm, F.rms_norm):
                eps = _arg(node, 3, "eps")
                eps = eps if eps is not None else (torch.finfo(xv.dtype).eps if xv is not None else None)
                name, args = "rms_norm", (x, w)
            else:
                eps = _arg(node, 4, "eps", 1e-5)
                name, args = "layer_norm", (x, w, _arg(node, 3, "bias"))
            if (
                xv is None
                or not isinstance(shape, list | tuple)
                or len(shape) != 1
                or shape[0] != xv.shape[-1]
            ):
                return f"{name} over more than the last dim"
            if not isinstance(eps, float | int):
                return f"{name} eps is not a number"
            return OpSpec(name, args, (("eps", float(eps)),))
    except (TypeError, IndexError):
        return "unrecognized arguments"
    return None


def _shape_key(shape) -> tuple[str, ...]:
    # Symbolic sizes compare by their printed expression: equal symbols print equal, without guards.
    return tuple(str(d) for d in shape)


def _classify(val: torch.Tensor, lead: tuple, n: int) -> str | None:
    shape = _shape_key(val.shape)
    if shape == lead + (str(n),):
        return "full"
    if val.dim() >= 1 and shape[-1] == str(n) and all(d == "1" for d in shape[:-1]):
        return "row"
    # rowscalar before scalar: with one row (batch-1 decode: lead all ones) a [1, 1, 1] row statistic is both,
    # and read as a scalar it left the rest of an RMSNorm without a per-row input (3 kernels instead of 1).
    if shape == lead + ("1",):
        return "rowscalar"
    if all(d == "1" for d in shape):
        return "scalar"
    return None


def _node_key(node: fx.Node, spec: OpSpec, keys: dict) -> tuple | str:
    """(lead dims, N, "full"|"rowscalar") of a fusible node, or a reason it is not fusible."""
    out = tensor_val(node)
    if out is None or out.dtype not in FLOAT_DTYPES:
        return f"output dtype {getattr(out, 'dtype', None)} (only fp32/fp16/bf16 are fused)"
    if out.dim() == 0:
        return "0-d output"
    src = tensor_val(spec.args[0]) if spec.op in ROW_REDUCTIONS else out
    if src is None or not isinstance(src.shape[-1], int):
        return "last dim is symbolic"
    n = src.shape[-1]
    if n > MAX_BLOCK:
        return f"row length {n} > MAX_BLOCK {MAX_BLOCK}"
    if not out.is_contiguous():
        return "non-contiguous output"
    lead = _shape_key(out.shape[:-1])
    if spec.op in ROW_REDUCTIONS:
        key = (lead, n, "rowscalar")
    else:
        inherited = [keys[a] for a in spec.args if isinstance(a, fx.Node) and isinstance(keys.get(a), tuple)]
        rs = [k for k in inherited if k[2] == "rowscalar" and k[0] == lead]
        key = rs[0] if n == 1 and rs else (lead, n, "full")
    has_main = False
    for a in spec.args:
        if not isinstance(a, fx.Node):
            if a is not None and not isinstance(a, int | float) or isinstance(a, bool):
                return f"non-numeric constant argument {a!r}"
            continue
        v = tensor_val(a)
        if v is None:
            return f"argument {a.name} is not a tensor"
        if v.dtype not in FLOAT_DTYPES:
            return f"input {a.name} has dtype {v.dtype}"
        cls = _classify(v, key[0], key[1])
        if spec.op in REDUCTIONS and cls != ("full" if a is spec.args[0] else "row"):
            return f"{spec.op} operand {a.name} {list(v.shape)} is not a full row / row vector"
        if cls is None or (
            key[2] == "rowscalar" and spec.op not in ROW_REDUCTIONS and cls not in ("rowscalar", "scalar")
        ):
            return f"broadcast of {a.name} {list(v.shape)} to {list(out.shape)}"
        if cls in ("full", "rowscalar") and not v.is_contiguous() and (cls == "rowscalar" or row_layout(v) is None):
            return f"non-contiguous input {a.name}"  # full rows may be evenly strided (a slice of a wider row)
        has_main |= cls == "full" or (key[2] == "rowscalar" and cls == "rowscalar")
    if not has_main:
        return "no full-row input (outer broadcast)"
    return key


def _convex(g: nx.DiGraph, s: set, pos: dict) -> bool:
    """True when no path leaves s and re-enters it (so s contracts to one node without a cycle)."""
    last = max(pos[n] for n in s)
    seen, stack = set(), [u for n in s for u in g.successors(n) if u not in s and pos[u] < last]
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        for w in g.successors(u):
            if w in s:
                return False
            if pos[w] < last and w not in seen:
                stack.append(w)
    return True


def split_linear_bias(gm: fx.GraphModule) -> list[fx.Node]:
    """Split linear(x, w, b) feeding a row op into linear(x, w) + b, so the bias add joins the group."""
    added = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.linear, torch._C._nn.linear):
            continue
        b = _arg(node, 2, "bias")
        bv, out = tensor_val(b), tensor_val(node)
        if bv is None or out is None or bv.dim() != 1 or not isinstance(out.shape[-1], int):
            continue
        if not any(isinstance(op_spec(u), OpSpec) for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            lin = gm.graph.call_function(node.target, (node.args[0], _arg(node, 1, "weight")))
        with gm.graph.inserting_after(lin):
            add = gm.graph.call_function(operator.add, (lin, b))
        node.replace_all_uses_with(add)
        lin.meta.update(node.meta)
        add.meta.update(node.meta)
        add.meta[EPILOGUE] = node.name
        gm.graph.erase_node(node)
        added.append(add)
    return added


def _unsplit(gm: fx.GraphModule, add: fx.Node) -> None:
    lin, b = add.args
    with gm.graph.inserting_before(add):
        new = gm.graph.call_function(lin.target, (lin.args[0], lin.args[1], b))
    new.meta.update(lin.meta)
    add.replace_all_uses_with(new)
    gm.graph.erase_node(add)
    gm.graph.erase_node(lin)


def partition(gm: fx.GraphModule, *, epilogues: bool = True) -> Partition:
    """Group fusible nodes; splits linear biases into epilogues (reverted where no kernel uses them)."""
    split = split_linear_bias(gm) if epilogues else []
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((a, n) for n in nodes for a in n.all_input_nodes)

    result = Partition()
    # A fused rotate_half reads x itself (its two halves from memory): the slices and the negation that fed
    # the cat are left to die with it, not fused on their own.
    for n in nodes:
        rot = rotate_half_parts(n)
        if rot and all(set(p.users) <= ({n} | set(rot[1])) for p in rot[1]):
            result.rotate_half_parts += rot[1]
    side = set(result.rotate_half_parts)
    specs, keys = {}, {}
    for n in nodes:
        if n in side:
            continue
        spec = op_spec(n)
        if spec is None:
            continue
        key = _node_key(n, spec, keys) if isinstance(spec, OpSpec) else spec
        if isinstance(key, str):
            result.fallbacks.append((n.name, key))
            continue
        specs[n], keys[n] = spec, key

    # Greedy in graph order: join the groups of the producers that share the row key, if still convex.
    group_of: dict[fx.Node, int] = {}
    members: dict[int, set] = {}
    for n in specs:
        prods = {group_of[a] for a in n.all_input_nodes if a in group_of and keys[a][:2] == keys[n][:2]}
        chosen: set[int] = set()
        if prods:
            union = {n}.union(*(members[g] for g in prods))
            if _convex(dag, union, pos):
                chosen = prods
            else:
                for g in sorted(prods, key=lambda g: -len(members[g])):
                    if _convex(dag, members[g] | {n}, pos):
                        chosen = {g}
                        break
        gid = min(chosen) if chosen else len(members) + 1000
        members.setdefault(gid, set()).add(n)
        for g in chosen - {gid}:
            members[gid] |= members.pop(g)
        for m in members[gid]:
            group_of[m] = gid

    keep_split = set()
    for gid in sorted(members, key=lambda g: min(pos[n] for n in members[g])):
        gnodes = sorted(members[gid], key=pos.get)
        real = [m for m in gnodes if specs[m].op != "cast" and EPILOGUE not in m.meta]
        if not real:
            for m in gnodes:
                if EPILOGUE not in m.meta:
                    result.fallbacks.append((m.name, "trivial group (only casts), not worth a kernel"))
            continue
        outputs = [m for m in gnodes if any(u not in members[gid] for u in m.users)]
        if not outputs:
            continue  # dead code: nothing reads it
        inputs: list[tuple[fx.Node, str]] = []
        lead, n_row, _ = keys[gnodes[0]]
        for m in gnodes:
            for a in specs[m].args:
                if isinstance(a, fx.Node) and a not in members[gid] and all(a is not i for i, _ in inputs):
                    inputs.append((a, _classify(tensor_val(a), lead, n_row)))
        if not any(c == "full" for _, c in inputs):
            for m in gnodes:
                result.fallbacks.append((m.name, "group has no full-row input"))
            continue
        epi = [m for m in gnodes if EPILOGUE in m.meta]
        keep_split.update(epi)
        kind = (
            "epilogue"
            if epi
            else "reduction"
            if any(specs[m].op in REDUCTIONS for m in gnodes)
            else "pointwise"
        )
        result.groups.append(FusionGroup(gnodes, {m: specs[m] for m in gnodes}, inputs, outputs, n_row, kind))

    for add in split:
        if add not in keep_split:
            _unsplit(gm, add)
    return result


def group_tag(group: FusionGroup):
    return group.nodes[-1].meta.get(TAG)
