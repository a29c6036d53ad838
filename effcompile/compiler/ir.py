"""The IR: a torch.fx GraphModule whose nodes carry tensor metadata and transformer sublayer tags.

Every pass and the code generator read the same two node.meta keys:

* ``meta["val"]``  - a (fake) tensor describing the node's output: shape (maybe symbolic), dtype, device.
* ``meta["ec_tag"]`` - a :class:`Sublayer`: which block and which part of it (``layers.3.attn``) the node
  belongs to, plus its kind (``norm``, ``residual`` or ``op``). Tags are computed from module paths and
  graph structure only, so they are the same every time the same model is traced.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from effcompile.compiler import meta
from effcompile.compiler.meta import (  # noqa: F401 - the IR's API
    VAL,
    fake_mode_for,
    node_val,
    propagate_meta,
    refresh_meta,
)
from effcompile.runtime.key import contents_version

TAG = "ec_tag"

_ATTN_WORDS = ("attn", "attention")
_FFN_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "output", "fc1", "fc2")
_NORM_TARGETS = {"layer_norm", "rms_norm", "group_norm", "batch_norm"}


@dataclass(frozen=True)
class Sublayer:
    """Where a node sits in a transformer: ``part`` is embedding/attn/ffn/head/other."""

    part: str
    block: int | None = None
    kind: str = "op"  # "op", "norm" or "residual"
    module: str = ""  # module path the node was traced under ("" when none)

    def __str__(self) -> str:
        return f"layers.{self.block}.{self.part}" if self.block is not None else self.part


def tensor_val(node) -> torch.Tensor | None:
    val = node_val(node) if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def target_name(node: fx.Node) -> str:
    """A short, stable name for what a node computes ("linear", "add", "view", ...)."""
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None) or str(t)
    return name.rstrip("_") if name in ("and_", "or_") else name


def qualified_target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return f"torch.ops.{t}"
    mod = getattr(t, "__module__", None) or ""
    if mod == "_operator":
        mod = "operator"
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}"


# ---------------------------------------------------------------------------------------------
# Module paths and sublayer tags
# ---------------------------------------------------------------------------------------------

_GETATTR = re.compile(r"getattr\((.*), ['\"]([^'\"]+)['\"]\)")


def normalize_path(path: str) -> str:
    """Turn dynamo's module source strings (L['self'].encoder.layer[0]) into dotted paths."""
    while True:
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    # Drop the frame-local root: L['self'], L['args'][0] (wrapped forwards), L['kwargs']['m'], G['model'].
    path = re.sub(r"^(?:[LG]\.)?(?:args\.\d+|kwargs\.[^.]+|self|[^.]+)(?:\.|$)", "", path, count=1)
    return path.strip(".")


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_path(path if isinstance(path, str) else str(path))


def _module_type(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    typ = list(stack.values())[-1][1]
    return getattr(typ, "__name__", str(typ))


def _find_block_container(paths: list[str]) -> str | None:
    """The module list whose integer-indexed children hold the transformer blocks.

    A container qualifies if its children hold both attention and FFN submodules (so a 1-layer model
    still has a block), or failing any such, if it has at least two indexed children.
    """
    counts: Counter[str] = Counter()
    children: dict[str, set[str]] = {}
    parts_seen: dict[str, set[str | None]] = {}
    for p in paths:
        parts = p.split(".")
        for i, comp in enumerate(parts):
            if comp.isdigit() and i > 0:
                prefix = ".".join(parts[:i])
                counts[prefix] += 1
                children.setdefault(prefix, set()).add(comp)
                parts_seen.setdefault(prefix, set()).add(_part_of(".".join(parts[i + 1:])))
                break  # only the outermost indexed container counts
    blocky = [p for p in counts if {"attn", "ffn"} <= parts_seen[p]]
    candidates = blocky or [p for p in counts if len(children[p]) >= 2]
    return max(candidates, key=lambda p: counts[p]) if candidates else None


def _part_of(rest: str) -> str | None:
    first = rest.split(".")[0].lower() if rest else ""
    if not first or "norm" in first or re.fullmatch(r"ln_?\d*", first):
        return None  # a block-level norm belongs to the sublayer it feeds: decided from the data flow
    if any(w in first for w in _ATTN_WORDS):
        return "attn"
    if any(w in first for w in _FFN_WORDS):
        return "ffn"
    return None


def _is_norm(node: fx.Node) -> bool:
    return target_name(node) in _NORM_TARGETS or "norm" in _module_type(node).lower()


def _is_residual_add(node: fx.Node, tags: dict[fx.Node, Sublayer | None]) -> bool:
    if node.op != "call_function" or target_name(node) not in ("add", "iadd"):
        return False
    a, b = (node.args + (None, None))[:2]
    ta, tb, out = tensor_val(a), tensor_val(b), tensor_val(node)
    if ta is None or tb is None or out is None or ta.shape != tb.shape or ta.shape != out.shape:
        return False
    sa, sb = tags.get(a), tags.get(b)
    # A residual joins a value computed inside a sublayer with one that bypassed it.
    return sa is None or sb is None or (sa.block, sa.part) != (sb.block, sb.part)


def tag_sublayers(gm: fx.GraphModule) -> dict[str, int]:
    """Set ``meta["ec_tag"]`` on every node; returns how many nodes each sublayer holds."""
    nodes = list(gm.graph.nodes)
    paths = {n: module_path(n) for n in nodes}
    container = _find_block_container([p for p in paths.values() if p])
    tags: dict[fx.Node, Sublayer | None] = {}
    block_of: dict[fx.Node, int | None] = {}
    for n in nodes:
        p = paths[n]
        block = None
        part = None
        if container and p.startswith(container + "."):
            idx, _, rest = p[len(container) + 1 :].partition(".")
            if idx.isdigit():
                block = int(idx)
                part = _part_of(rest)
        block_of[n] = block
        tags[n] = Sublayer(part, block, "op", p) if part else None

    # Placeholders (inputs, parameters) come first whatever they feed, so positions count only ops.
    blocks = [i for i, n in enumerate(nodes) if block_of[n] is not None and n.op != "placeholder"]
    first, last = (blocks[0], blocks[-1]) if blocks else (len(nodes), len(nodes))
    for i, n in enumerate(nodes):
        if block_of[n] is not None or n.op in ("output", "placeholder"):
            continue
        if i < first:
            part = "embedding" if "embed" in paths[n].lower() or target_name(n) == "embedding" else "other"
        elif i > last:
            part = "head"
        else:
            part = "other"
        tags[n] = Sublayer(part, None, "op", paths[n])
    module_tags = dict(tags)  # before data-flow inheritance: what the module paths alone say

    # Nodes inside a block but outside attn/ffn modules (pre-norms, residual adds of Llama/GPT-2
    # blocks) belong to the sublayer they feed (pre-norm) or, failing that, the one they read.
    def inherit(n: fx.Node, near: list[fx.Node]) -> None:
        if tags.get(n) is None and block_of[n] is not None:
            same = [tags.get(m) for m in near]
            same = [t for t in same if t is not None and t.block == block_of[n] and t.part in ("attn", "ffn")]
            if same:
                tags[n] = Sublayer(same[0].part, block_of[n], "op", paths[n])

    for n in reversed(nodes):
        inherit(n, list(n.users))
    for n in nodes:
        inherit(n, n.all_input_nodes)
    for n in nodes:
        if tags.get(n) is None and n.op == "placeholder":
            user = next((u for u in n.users if tags.get(u) is not None), None)
            tags[n] = Sublayer(tags[user].part, tags[user].block, "op", paths[n]) if user else Sublayer("input")
        elif tags.get(n) is None and n.op != "output":
            tags[n] = Sublayer("other", block_of[n], "op", paths[n])

    # Residual adds first look at where their operands came from, so decide them on the final tags.
    kinds = {}
    for n in nodes:
        if n.op == "output":
            continue
        if _is_norm(n) and n.op in ("call_function", "call_method"):
            kinds[n] = "norm"
        elif _is_residual_add(n, module_tags):
            kinds[n] = "residual"
    order = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op == "output":
            continue
        t = tags[n]
        if kinds.get(n) == "residual":
            # The residual add closes the sublayer whose output it adds: of its two operands, the one
            # computed last (the bypassed stream was produced earlier).
            inner = max((a for a in n.args[:2] if isinstance(a, fx.Node)), key=order.__getitem__)
            it = tags.get(inner)
            if it is not None and it.part in ("attn", "ffn") and (it.block == t.block or t.block is None):
                t = Sublayer(it.part, it.block, t.kind, t.module)
        if n in kinds:
            t = Sublayer(t.part, t.block, kinds[n], t.module)
        n.meta[TAG] = t
    return dict(Counter(str(n.meta[TAG]) for n in nodes if TAG in n.meta))


def sublayer(node: fx.Node) -> Sublayer | None:
    return node.meta.get(TAG)


# ---------------------------------------------------------------------------------------------
# Metadata propagation, invariants, fingerprint
# ---------------------------------------------------------------------------------------------


def tensor_key(t: torch.Tensor) -> tuple:
    """What a shared-tensor key calls ``t``: the key it was made under (shared_tensors), else its id and version."""
    return getattr(t, "_ec_made_from", None) or ("id", id(t), contents_version(t))


def shared_tensors(shared: dict, space: str, key: tuple, make: Callable[[], tuple], hold: tuple = ()) -> tuple:
    """``make()``'s tensors, made once for all of a compiled model's graphs (``shared``: PassContext.shared) while
    some graph still holds them: prefill and each decode shape compile a graph, and each made its own copy of every
    weight a pass re-lays out (llama-1b bf16 at 50 % thresholds: 3.89 GB of input-major copies for 1.94 GB of
    weights). The memo holds them weakly, so a layout a later step replaced (lowering's packed copy) is freed, and
    ``hold`` strongly: the tensors whose ids ``key`` names (tensor_key), so those ids are not reused while it lives.
    Each tensor made is tagged with its key, by which a later step keys what it makes from it; a tensor ``make``
    passed through unchanged (int8's scales in sl.to_input_major) keeps its own name, so the next graph's key matches."""
    memo = shared.setdefault(space, {})
    if key in memo:
        out = tuple(r() if r is not None else None for r in memo[key][1])
        if all(o is not None for o, r in zip(out, memo[key][1], strict=True) if r is not None):
            return out
    out = tuple(make())
    for i, t in enumerate(out):
        if t is not None and not any(t is h for h in hold) and not hasattr(t, "_ec_made_from"):
            t._ec_made_from = (space, key, i)
    memo[key] = (hold, tuple(weakref.ref(t) if t is not None else None for t in out))
    return out


def loaded_tensor(shared: dict, sha: str) -> torch.Tensor | None:
    """The tensor another graph of the compiled model loaded from blob ``sha`` (share_loaded_tensors' memo), if it is
    alive and unchanged since: the cache hands it to the next entry that names the blob instead of reading and hashing
    the file again (a blob's bytes were checked against ``sha`` when first read)."""
    ref, version = shared.get("loaded.tensors", {}).get(sha, (None, None))
    t = ref() if ref is not None else None
    return t if t is not None and contents_version(t) == version else None


def share_loaded_tensors(shared: dict, tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> int:
    """Replace, in ``tensors`` (a cache entry's, as loaded), each tensor read from a blob (``digests``: name -> the
    SHA-256 the cache checked its bytes against) by the tensor another graph of the compiled model loaded from the same
    blob (``shared``: PassContext.shared, a weak memo), unless that one was changed in place since; returns the bytes
    freed. The disk cache stores a blob per content, but each entry reads its own copy, so a warm start held one copy
    of a packed weight per graph where the cold compile held one for all (shared_tensors)."""
    memo = shared.setdefault("loaded.tensors", {})
    freed = 0
    for name, sha in digests.items():
        other = loaded_tensor(shared, sha)
        if other is not None:
            freed += tensors[name].untyped_storage().nbytes() if tensors[name] is not other else 0
            tensors[name] = other
        else:
            memo[sha] = (weakref.ref(tensors[name]), contents_version(tensors[name]))
    return freed


def place_loaded_tensors(shared: dict, tensors: dict[str, torch.Tensor], digests: dict[str, str],
                         devices: dict[str, str]) -> dict[str, torch.Tensor]:
    """``tensors`` (a cache entry's, on the CPU as safetensors loads them) with each blob tensor (``digests``) moved to
    its graph's device (``devices``: name -> device) once for all of the compiled model's graphs: each graph moved its
    own copy, so a CUDA warm start held a device copy of every packed weight per graph (prefill and each decode shape)
    where the cold compile held one. Weak memo by (blob, device), as share_loaded_tensors; a copy changed in place is
    not handed out again. Other tensors are left to graph_from_json; a device this process lacks is left to it too
    (it names the tensor). Returns a new dict: the store's in-memory layer keeps CPU tensors, not device ones."""
    memo = shared.setdefault("loaded.placed", {})
    out = dict(tensors)
    for name, sha in digests.items():
        device = devices.get(name, "cpu")
        ref, version = memo.get((sha, device), (None, None))
        moved = ref() if ref is not None else None
        if moved is None or contents_version(moved) != version:
            try:
                moved = out[name].to(torch.device(device))
            except Exception:  # noqa: BLE001 - graph_from_json reports the device this process cannot use
                continue
            if moved is out[name]:
                continue  # already there (a CPU graph): nothing to share
            memo[(sha, device)] = (weakref.ref(moved), contents_version(moved))
        out[name] = moved
    return out


def add_buffer(gm: fx.GraphModule, before: fx.Node, name: str, t: torch.Tensor | None, tag, mode) -> fx.Node | None:
    """Register ``t`` as a buffer of gm and read it with a get_attr node before ``before`` (meta filled).

    Passes keep the tensors they compute (packed weights, thresholds) as buffers: the cache stores
    get_attr tensors as safetensors, so a warm start loads them instead of recomputing. None -> None.
    """
    if t is None:
        return None
    gm.register_buffer(name, t)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta[VAL] = mode.from_tensor(t, static_shapes=True)  # a constant: its sizes are not input dims
    node.meta[TAG] = tag
    return node


def attr_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a get_attr node reads (None for any other argument)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def node_tensor(gm: fx.GraphModule, node, params: dict) -> torch.Tensor | None:
    """The real tensor behind a weight/bias argument: a lifted parameter (``params``: PassContext.params)
    or a get_attr buffer; None for anything else."""
    if not isinstance(node, fx.Node):
        return None
    return params.get(node.name) if node.op == "placeholder" else attr_tensor(gm, node)


def value_key(t: torch.Tensor) -> tuple:
    """(dtype, shape, bytes): equal exactly when two tensors hold the same values (the bytes, not .numpy():
    numpy has no bf16)."""
    return t.dtype, tuple(t.shape), t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def drop_unused_attrs(gm: fx.GraphModule, nodes) -> None:
    """Erase the get_attr nodes among ``nodes`` that a rewrite left without users, and their buffers,
    so a replaced weight layout is neither kept in memory nor cached. A node listed twice (an attribute several
    rewritten nodes read, e.g. the threshold that q / k / v share) is erased once."""
    for n in dict.fromkeys(nodes):
        if isinstance(n, fx.Node) and n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
            if "." not in n.target and n.target in gm._buffers:
                del gm._buffers[n.target]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be rewritten independently; node meta is copied shallowly.

    (copy.deepcopy would also copy the fake tensors in meta, detaching them from the fake mode
    and shape environment dynamo traced them under.)
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def annotate(gm: fx.GraphModule, example_inputs=()) -> dict[str, int]:
    """Make a freshly captured graph into IR: fill ``meta["val"]`` and sublayer tags."""
    missing = False
    for n in gm.graph.nodes:
        if VAL not in n.meta and "example_value" in n.meta:
            n.meta[VAL] = n.meta["example_value"]
        if VAL not in n.meta and n.op != "output" and n.users:
            missing = True
    if missing:
        propagate_meta(gm, example_inputs)
    else:
        meta.record_fingerprints(gm)  # dynamo's values, computed from the nodes as they are now
    return tag_sublayers(gm)


class InvariantError(RuntimeError):
    """The IR broke one of the rules every pass must keep (see passes/README.md)."""


def check_invariants(gm: fx.GraphModule) -> None:
    """Lint the graph and check that every value-producing node has metadata and a tag."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if VAL not in n.meta and n.users:  # unused results (e.g. a logging call's None) need none
            raise InvariantError(f"node {n.name} ({n.op} {target_name(n)}) has no meta['val']")
        if TAG not in n.meta:
            raise InvariantError(f"node {n.name} ({n.op} {target_name(n)}) has no sublayer tag")
        if n.op == "call_module":
            raise InvariantError(f"node {n.name}: call_module is not part of the IR (targets are functions)")


def _canon_arg(a, index: dict) -> str:
    if isinstance(a, fx.Node):
        return f"%{index[a]}"
    if isinstance(a, list | tuple):
        inner = ",".join(_canon_arg(x, index) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k}:{_canon_arg(v, index)}" for k, v in sorted(a.items())) + "}"
    return repr(a)


def fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's structure and constants (not of tensor values fed as inputs)."""
    h = hashlib.sha256()
    index: dict[fx.Node, int] = {}
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        target = n.target if n.op == "placeholder" else qualified_target(n)
        line = f"{n.op}|{target}|{_canon_arg(n.args, index)}|{_canon_arg(n.kwargs, index)}"
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            if isinstance(t, torch.Tensor):
                # Constants baked into the graph are part of what it computes.
                line += "|" + hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def triton_runs(gm: fx.GraphModule, example_inputs=(), params=None) -> bool:
    """Whether codegen will run this graph's kernels as Triton: CUDA tensors among its inputs, parameters and
    buffers, or TRITON_INTERPRET=1 (as codegen/ops.py decides per call)."""
    tensors = [*example_inputs, *(params or {}).values()]
    tensors += [v for n in gm.graph.nodes if n.op == "get_attr" if (v := attr_tensor(gm, n)) is not None]
    cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors)
    return cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"
