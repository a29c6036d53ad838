"""Shared graph surgery for token-reducing passes: find the attention blocks, shrink the sequence downstream."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from effcompile.compiler import ir

SDPA = "scaled_dot_product_attention"
# Methods/functions whose integer arguments are sizes: a literal S in them must become the new length.
_SIZE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty"}
# Comparisons that build a causal mask (kv_idx <= q_idx) in HF's mask functions.
_CAUSAL_HINTS = {"le", "lt", "gt", "tril", "triu"}


class Refuse(Exception):
    """The rewrite cannot be done safely on this graph; the message says why (it becomes the pass note)."""


@dataclass
class Block:
    index: int
    sdpa: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    causal: bool
    mid: fx.Node | None  # the stream between attention and MLP (feeds the MLP and its residual)


@dataclass
class Layers:
    blocks: dict[int, Block] = field(default_factory=dict)
    seq_len: int | torch.SymInt | None = None
    batch: int | torch.SymInt | None = None


def sdpa_arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def set_sdpa_mask(node: fx.Node, mask: fx.Node | None) -> None:
    if len(node.args) > 3:
        node.update_arg(3, mask)
    else:
        node.update_kwarg("attn_mask", mask)


def _is_causal_mask(mask: fx.Node | None) -> bool:
    seen, todo = set(), [mask] if mask is not None else []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("call_function", "call_method") and ir.target_name(n) in _CAUSAL_HINTS:
            return True
        todo.extend(n.all_input_nodes)
    return False


def find_layers(gm: fx.GraphModule, who: str) -> Layers:
    """The blocks with a scaled_dot_product_attention call; a clear ValueError when there are none."""
    out = Layers()
    for n in gm.graph.nodes:
        tag = ir.sublayer(n)
        if n.op != "call_function" or ir.target_name(n) != SDPA or tag is None or tag.block is None:
            continue
        if tag.block in out.blocks:
            raise ValueError(f"{who}: layers.{tag.block} has more than one scaled_dot_product_attention call; "
                             f"it needs one self-attention per block")
        q, k, v = (sdpa_arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
        mask = sdpa_arg(n, 3, "attn_mask")
        causal = bool(sdpa_arg(n, 5, "is_causal", False)) or _is_causal_mask(mask)
        out.blocks[tag.block] = Block(tag.block, n, q, k, v, mask, causal, _mid(gm, tag.block, n))
    if not out.blocks:
        found = sorted({ir.target_name(n) for n in gm.graph.nodes if n.op == "call_function"
                        and ir.target_name(n) in ("matmul", "bmm", "softmax", "baddbmm")})
        extra = (f" (found {found}: eager attention; load Hugging Face models with attn_implementation='sdpa')"
                 if found else "")
        raise ValueError(f"{who} needs attention it can find: a torch.nn.functional.scaled_dot_product_attention "
                         f"call inside a transformer block (a node tagged layers.<i>.attn); this graph has none{extra}")
    first = out.blocks[min(out.blocks)]
    x = ir.tensor_val(first.q)
    if x is None or x.dim() != 4:
        raise ValueError(f"{who}: the attention query of layers.{first.index} is not [batch, heads, seq, dim]")
    out.batch, out.seq_len = x.shape[0], x.shape[2]
    for b in out.blocks.values():
        if b.mid is None:
            raise ValueError(f"{who}: cannot find the stream between attention and MLP of layers.{b.index} "
                             f"(the earlier operand of the block's last residual add, after its attention)")
    return out


def _mid(gm: fx.GraphModule, block: int, sdpa: fx.Node) -> fx.Node | None:
    """The stream between attention and MLP: the bypass operand of the block's last residual add (BERT's
    post-attention norm, a pre-norm model's attention residual add). It feeds the MLP and its residual."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = None
    for n in gm.graph.nodes:
        t = ir.sublayer(n)
        if t is not None and t.block == block and t.kind == "residual":
            last = n
    if last is None:
        return None
    ops = [a for a in last.args[:2] if isinstance(a, fx.Node)]
    if len(ops) != 2:
        return None
    mid = min(ops, key=order.__getitem__)
    val = ir.tensor_val(mid)
    if val is None or val.dim() != 3 or order[mid] < order[sdpa]:
        return None
    return mid


def key_validity(mask: torch.Tensor | None, b: int, s: int, device) -> torch.Tensor:
    """[B, S] bool: which keys the attention mask lets any query see (padding is False)."""
    if mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=device)
    m = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if m.dim() >= 2:
        m = m.any(-2) if m.dim() > 2 else m
    while m.dim() > 2:
        m = m[:, 0]
    return m.expand(b, s)


def _size_args(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _SIZE_METHODS) or (
        n.op == "call_function" and ir.target_name(n) in ("reshape", "view") and len(n.args) > 1)


def same_size(a, b) -> bool:
    """Equal sizes: ints by value, symbolic sizes by expression."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return isinstance(a, int) and isinstance(b, int) and a == b


def _count(shape, s) -> int:
    return sum(1 for d in shape if same_size(d, s))


def sym_node(gm: fx.GraphModule, s: torch.SymInt) -> fx.Node | None:
    """The first graph value that is the symbolic size ``s`` (a SymInt placeholder or a size() call)."""
    for n in gm.graph.nodes:
        v = ir.node_val(n)
        if isinstance(v, torch.SymInt) and str(v) == str(s):
            return n
    return None


def _replace_sizes(a, old, new):
    """Literal (static) or symbolic (a node holding the SymInt) occurrences of the old length -> new."""
    if isinstance(a, fx.Node):
        v = ir.node_val(a)
        return new if isinstance(v, torch.SymInt) and str(v) == str(old) else a
    if isinstance(a, bool) or not isinstance(old, int):
        return a if not isinstance(a, tuple | list) else type(a)(_replace_sizes(x, old, new) for x in a)
    if isinstance(a, int):
        return new if a == old else a
    if isinstance(a, tuple | list):
        return type(a)(_replace_sizes(x, old, new) for x in a)
    return a


def _expr(d):
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def _prefix_equal(a, b) -> bool:
    return sympy.expand(sympy.Mul(*[_expr(x) for x in a]) - sympy.Mul(*[_expr(x) for x in b])) == 0


def _token_dims(n: fx.Node, out, tok: dict, s_old) -> set[int]:
    """Which dims of n's output are the sequence, from where its reduced inputs carry it (not from sizes
    alone: a head_dim or batch equal to the sequence length must not be mistaken for it)."""
    name = n.target if n.op == "call_method" else ir.target_name(n)
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    sv = ir.tensor_val(src) if src is not None else None
    if name in ("view", "reshape") and src in tok and sv is not None:
        # A view keeps a dim when the sizes before it multiply to the same number on both sides.
        return {j for t in tok[src] for j in range(out.dim())
                if same_size(out.shape[j], sv.shape[t]) and _prefix_equal(out.shape[:j], sv.shape[:t])}
    if name == "transpose" and src in tok:
        d0, d1 = (int(x) % out.dim() for x in n.args[1:3])
        return {d1 if t == d0 else d0 if t == d1 else t for t in tok[src]}
    if name == "permute" and src in tok:
        perm = n.args[1] if isinstance(n.args[1], tuple | list) else n.args[1:]
        return {j for j, p in enumerate(perm) if int(p) % out.dim() in tok[src]}
    if name == "unsqueeze" and src in tok:
        d = int(n.args[1]) % out.dim()
        return {t + (1 if t >= d else 0) for t in tok[src]}
    if name == SDPA:
        return set(tok.get(src, ()))
    dims = set()  # elementwise, linear, norms, slices of the last dim, cat along it: right-aligned
    for a in n.all_input_nodes:
        if a not in tok:
            continue
        av = ir.tensor_val(a)  # the reduction's own new nodes have no metadata yet: same rank as the stream
        shift = out.dim() - (av.dim() if av is not None else out.dim())
        dims |= {t + shift for t in tok[a] if 0 <= t + shift < out.dim() and same_size(out.shape[t + shift], s_old)}
    return dims


def _replace_at(args, positions: set[int], old, new):
    """Sizes given as separate args or as one tuple: replace the sequence length at the token dims only."""
    if len(args) == 1 and isinstance(args[0], tuple | list):
        return (type(args[0])(_replace_at(tuple(args[0]), positions, old, new)),)
    return tuple(_replace_sizes(x, old, new) if i in positions else x for i, x in enumerate(args))


# Ops whose first argument is the activation and the rest are weights (never aligned with its dims).
_WEIGHTED = frozenset({"linear", "wq_linear", "sparse_linear"})


def retarget_downstream(gm: fx.GraphModule, stage_of: dict[fx.Node, int], stage_len: list, ours: set,
                        *, on_sdpa, on_exit, on_foreign, keep_at_output=None) -> None:
    """Make every node downstream of a token reduction work on the shorter sequence.

    ``stage_of`` maps the reduction's output nodes ([B, N, ...]) to their stage (length
    ``stage_len[stage]``). Walking in graph order, a node reading a reduced value is reduced too; which of
    its dims is the sequence is tracked through views, transposes and broadcasting. Its size arguments
    get the new length at those dims, its SDPA mask goes to ``on_sdpa(node, stage)``, an unreduced tensor
    with the sequence at an aligned dim goes to ``on_foreign(node, input, stage, dims)`` (None: refuse),
    and where the stream leaves the blocks ``on_exit(value, stage, consumer)`` restores the sequence.
    """
    s_old = stage_len[0]
    tok: dict[fx.Node, set[int]] = {n: {1} for n in stage_of}
    exits: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
    for n in list(gm.graph.nodes):
        if n in ours or n.op in ("placeholder", "get_attr"):
            continue
        st = max((stage_of.get(a, 0) for a in n.all_input_nodes), default=0)
        if st == 0:
            continue
        tag = ir.sublayer(n)
        if n.op == "output" or tag is None or tag.block is None:
            for a in n.all_input_nodes:
                sa = stage_of.get(a, 0)
                if sa == 0 or (n.op == "output" and keep_at_output is not None and keep_at_output(a)):
                    continue
                val = ir.tensor_val(a)
                if val is None or tok.get(a) != {1}:
                    raise Refuse(f"{n.name} reads {a.name} (shape {tuple(val.shape) if val is not None else '?'}) "
                                 f"outside the blocks; only [batch, seq, ...] values can be restored")
                e = exits.get((a, n))
                if e is None:
                    e = exits[(a, n)] = on_exit(a, sa, n)
                    ours.add(e)
                n.replace_input_with(a, e)
            continue
        out = ir.tensor_val(n)
        dims = _token_dims(n, out, tok, s_old) if out is not None else set()
        if n.op == "call_function" and ir.target_name(n) == SDPA:
            on_sdpa(n, st)
        weights_only = ir.target_name(n) in _WEIGHTED
        for a in list(n.all_input_nodes):
            if stage_of.get(a, 0) or a in ours:
                continue
            if weights_only and a is not n.args[0]:
                continue  # a linear's weight is contracted, not broadcast: an out_features == S is no sequence
            val = ir.tensor_val(a)
            if val is None or out is None:
                continue
            shift = out.dim() - val.dim()
            adims = [d - shift for d in dims if 0 <= d - shift < val.dim() and same_size(val.shape[d - shift], s_old)]
            if adims:
                if on_foreign is None:
                    raise Refuse(f"{n.name} ({ir.target_name(n)}) combines the reduced tokens with {a.name} of "
                                 f"shape {tuple(val.shape)}, which has the sequence at dim(s) {adims}")
                rep = on_foreign(n, a, st, adims)
                ours.add(rep)
                n.replace_input_with(a, rep)
        if _size_args(n):
            n.args = (n.args[0], *_replace_at(n.args[1:], dims, s_old, stage_len[st]))
        stage_of[n] = st
        if dims:
            tok[n] = dims


def insert_after(g: fx.Graph, anchor: fx.Node, fn, args) -> fx.Node:
    with g.inserting_after(anchor):
        return g.call_function(fn, args)


def adopt(gm: fx.GraphModule, work: fx.GraphModule) -> None:
    """Make ``gm`` run the rewritten copy's graph (the pass works on a copy so a refusal leaves gm intact)."""
    gm.graph = work.graph
