"""fx.GraphModule <-> JSON (plus a dict of tensors for safetensors), without pickle or exec of stored code."""

from __future__ import annotations

import builtins
import importlib
import keyword
import math
import re
import types
from typing import Any

import torch
import torch.fx as fx

FORMAT = 1
_ALLOWED_ROOTS = ("torch", "operator", "math", "effcompile", "_operator")
# builtins are reachable only through this list: nothing that opens files, imports or evaluates.
_ALLOWED_BUILTINS = frozenset({"getattr", "len", "abs", "min", "max", "round", "pow", "int", "float", "bool",
                               "slice", "range", "tuple", "list", "divmod", "sum", "all", "any", "isinstance"})
# Under torch, names that load/save files or compile code are not graph operations.
_DENIED_PREFIXES = ("torch.load", "torch.save", "torch.hub", "torch.utils", "torch.package", "torch.serialization",
                    "torch.jit", "torch.compile", "torch._dynamo", "torch._inductor", "torch.multiprocessing",
                    "torch.distributed", "torch.ops.load_library", "torch.classes", "torch.cuda.memory")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DUNDER_METHODS = frozenset({"__getitem__", "__setitem__", "__add__", "__sub__", "__mul__", "__truediv__",
                             "__floordiv__", "__mod__", "__pow__", "__neg__", "__and__", "__or__", "__xor__",
                             "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"})


class NotSerializable(ValueError):
    """The graph holds something we cannot store safely (lambda, local function, opaque object)."""


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def _is_op(t) -> bool:
    return isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket)


def target_to_str(t: Any) -> str:
    """The importable qualified name of a call_function target; checked to resolve back to ``t``."""
    if isinstance(t, torch._ops.OpOverload):
        name = f"torch.ops.{t.namespace}.{t._opname}.{t._overloadname}"
    elif isinstance(t, torch._ops.OpOverloadPacket):
        ns, _, op = t._qualified_op_name.partition("::")
        name = f"torch.ops.{ns}.{op}"
    elif isinstance(t, torch._ops.HigherOrderOperator):
        raise NotSerializable(f"higher-order operator {t} carries subgraphs; not stored")
    else:
        mod = getattr(t, "__module__", None)
        qual = getattr(t, "__qualname__", None) or getattr(t, "__name__", None)
        owner = getattr(t, "__objclass__", None)
        if mod is None and owner is not None:  # method descriptors like torch._C.TensorBase.view
            mod, qual = owner.__module__, f"{owner.__qualname__}.{t.__name__}"
        if mod == "_operator":
            mod = "operator"
        if not mod or not qual or "<" in qual:
            raise NotSerializable(f"target {t!r} has no importable name (lambda or local function)")
        # torch.softmax's qualname is _VariableFunctionsClass.softmax, but it is exported as torch.softmax.
        names = [f"{mod}.{qual}", f"{mod}.{getattr(t, '__name__', qual)}"]
        return _first_resolving(t, names)
    return _first_resolving(t, [name])


def _first_resolving(t: Any, names: list[str]) -> str:
    errors = []
    for name in dict.fromkeys(names):
        try:
            back = resolve_target(name)
        except NotSerializable as e:
            errors.append(str(e))
            continue
        if back is t or (_is_op(t) and back == t):
            return name
        errors.append(f"{name} resolves to a different object")
    raise NotSerializable(f"target {t!r}: " + "; ".join(errors))


def resolve_target(name: str) -> Any:
    """Import ``name`` (module path + getattr chain) from the allow-listed roots only."""
    parts = name.split(".")
    root = parts[0]
    if root not in _ALLOWED_ROOTS and root != "builtins":
        raise NotSerializable(f"{name}: only targets under {', '.join(_ALLOWED_ROOTS)} or builtins are loaded")
    if any(not _IDENT.match(p) or (p.startswith("__") and p.endswith("__")) for p in parts):
        raise NotSerializable(f"{name}: not a plain dotted name")
    if any(name == d or name.startswith(d + ".") for d in _DENIED_PREFIXES):
        raise NotSerializable(f"{name}: file/compile/distributed APIs are not graph operations")
    if root == "builtins":
        if len(parts) != 2 or parts[1] not in _ALLOWED_BUILTINS:
            raise NotSerializable(f"{name}: builtin not on the allow-list")
        return getattr(builtins, parts[1])
    if parts[:2] == ["torch", "ops"]:
        return _resolve_op(name, parts)
    obj: Any = importlib.import_module(root)
    for i, p in enumerate(parts[1:], start=1):
        nxt = getattr(obj, p, None)
        if nxt is None and isinstance(obj, types.ModuleType):
            try:
                nxt = importlib.import_module(".".join(parts[: i + 1]))
            except Exception:  # ImportError, or a submodule that fails to import here
                nxt = None
        if nxt is None:
            raise NotSerializable(f"{name}: {'.'.join(parts[: i + 1])} does not exist")
        # A module reached by attribute must still live under the root: torch.os, effcompile.x.shutil
        # would otherwise lead out of the allow-list.
        if isinstance(nxt, types.ModuleType) and nxt.__name__.split(".")[0] not in _ALLOWED_ROOTS:
            raise NotSerializable(f"{name}: leads to module {nxt.__name__} outside the allow-list")
        obj = nxt
    if isinstance(obj, types.ModuleType) or not callable(obj):
        raise NotSerializable(f"{name}: not a callable")
    mod = getattr(obj, "__module__", None)
    if isinstance(obj, types.FunctionType) and mod and mod.split(".")[0] not in _ALLOWED_ROOTS:
        raise NotSerializable(f"{name}: is {mod}.{obj.__qualname__}, defined outside the allow-list")
    return obj


def _resolve_op(name: str, parts: list[str]) -> Any:
    if len(parts) not in (4, 5):
        raise NotSerializable(f"{name}: expected torch.ops.<ns>.<op>[.<overload>]")
    try:
        packet = getattr(getattr(torch.ops, parts[2]), parts[3])
        return getattr(packet, parts[4]) if len(parts) == 5 else packet
    except (AttributeError, RuntimeError):
        raise NotSerializable(f"{name}: operator not registered in this process "
                              f"(load the module that defines it first)") from None


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"$node": a.name}
    if a is None or isinstance(a, bool | str):
        return a
    if isinstance(a, int) and not isinstance(a, torch.SymInt):
        return int(a)
    if isinstance(a, float):
        return a if math.isfinite(a) else {"$float": repr(a)}
    if isinstance(a, complex):
        return {"$complex": [_enc(a.real), _enc(a.imag)]}
    if isinstance(a, torch.Size):
        return {"$size": [_enc(x) for x in a]}
    if isinstance(a, tuple):
        return {"$tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        return {"$dict": [[_enc(k), _enc(v)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"$slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    if a is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"$dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"$device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"$memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"$layout": str(a).removeprefix("torch.")}
    raise NotSerializable(f"argument of type {type(a).__qualname__} ({a!r:.60}) cannot be stored")


def _torch_attr(name: str, kind: type) -> Any:
    v = getattr(torch, name, None) if _IDENT.match(name) else None
    if not isinstance(v, kind):
        raise NotSerializable(f"unknown {kind.__name__} {name!r}")
    return v


def _dec(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if a is None or isinstance(a, bool | str | int | float):
        return a
    if isinstance(a, list):
        return [_dec(x, nodes) for x in a]
    if not isinstance(a, dict) or len(a) != 1:
        raise NotSerializable(f"malformed argument {a!r:.60}")
    (tag, v), = a.items()
    if tag == "$node":
        if v not in nodes:
            raise NotSerializable(f"reference to undefined node {v!r}")
        return nodes[v]
    if tag == "$float":
        if v not in ("nan", "inf", "-inf"):
            raise NotSerializable(f"bad float {v!r}")
        return float(v)
    if tag == "$complex":
        return complex(_dec(v[0], nodes), _dec(v[1], nodes))
    if tag == "$size":
        return torch.Size([_dec(x, nodes) for x in v])
    if tag == "$tuple":
        return tuple(_dec(x, nodes) for x in v)
    if tag == "$dict":
        return {_dec(k, nodes): _dec(x, nodes) for k, x in v}
    if tag == "$slice":
        return slice(*(_dec(x, nodes) for x in v))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$dtype":
        return _torch_attr(v, torch.dtype)
    if tag == "$device":
        return torch.device(v)
    if tag == "$memory_format":
        return _torch_attr(v, torch.memory_format)
    if tag == "$layout":
        return _torch_attr(v, torch.layout)
    raise NotSerializable(f"unknown argument tag {tag!r}")


# ---------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def graph_to_json(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(obj, tensors)``: a JSON-ready description of the graph and the get_attr tensors it reads."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise NotSerializable(f"graph uses {type(gm.graph._codegen).__name__} (pytree codegen); not stored")
    nodes, tensors, attrs = [], {}, {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            target = target_to_str(n.target)
        elif n.op in ("placeholder", "output", "call_method"):
            target = n.target
        elif n.op == "get_attr":
            target = n.target
            if target not in attrs:
                value = _fetch_attr(gm, target)
                if type(value) not in (torch.Tensor, torch.nn.Parameter):
                    raise NotSerializable(f"get_attr {target} is a {type(value).__qualname__}, not a plain tensor")
                # The tensor itself where it needs no detaching, so the cache knows it again (CacheStore._stored).
                tensors[target] = value.detach() if value.requires_grad else value
                attrs[target] = {"kind": "parameter" if isinstance(value, torch.nn.Parameter) else "tensor",
                                 "requires_grad": bool(value.requires_grad), "device": str(value.device)}
        else:
            raise NotSerializable(f"node {n.name}: {n.op} is not stored (submodules are not part of the IR)")
        nodes.append({"op": n.op, "name": n.name, "target": target,
                      "args": _enc(n.args), "kwargs": _enc(dict(n.kwargs))})
    return {"format": FORMAT, "nodes": nodes, "attrs": attrs}, tensors


def _check_ident(what: str, s: Any, dotted: bool = False) -> str:
    # Names end up in the Python source fx generates; anything but identifiers could inject code.
    parts = s.split(".") if dotted and isinstance(s, str) else [s]
    if not all(isinstance(p, str) and _IDENT.match(p) and not keyword.iskeyword(p) for p in parts):
        raise NotSerializable(f"{what} {s!r} is not a valid identifier")
    return s


def graph_from_json(obj: dict, tensors: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """Rebuild the GraphModule; any unknown target, malformed record or missing tensor -> NotSerializable."""
    tensors = tensors or {}
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise NotSerializable(f"graph JSON format {obj.get('format') if isinstance(obj, dict) else obj!r:.40}, "
                              f"expected {FORMAT}")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    attrs = obj.get("attrs", {})
    for rec in obj.get("nodes", []):
        op, name, target = rec.get("op"), rec.get("name"), rec.get("target")
        _check_ident("node name", name)
        if name in nodes:
            raise NotSerializable(f"duplicate node name {name!r}")
        args, kwargs = _dec(rec.get("args"), nodes), _dec(rec.get("kwargs"), nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise NotSerializable(f"node {name}: malformed args/kwargs")
        if op == "call_function":
            target = resolve_target(target)
            if target is getattr and len(args) > 1 and isinstance(args[1], str) and args[1].startswith("_"):
                raise NotSerializable(f"node {name}: getattr of private attribute {args[1]!r}")
        elif op == "call_method":
            _check_ident("method", target)
            if target.startswith("__") and target not in _DUNDER_METHODS:
                raise NotSerializable(f"node {name}: method {target} not allowed")
        elif op == "placeholder":
            _check_ident("placeholder", target)
        elif op == "get_attr":
            _check_ident("attribute", target, dotted=True)
            if target not in tensors:
                raise NotSerializable(f"node {name}: tensor {target} missing")
            if target not in root:
                info = attrs.get(target, {})
                t = _to_device(tensors[target], info.get("device", "cpu"), target)
                root[target] = (torch.nn.Parameter(t, requires_grad=bool(info.get("requires_grad")))
                                if info.get("kind") == "parameter" else t)
        elif op == "output":
            pass
        else:
            raise NotSerializable(f"node {name}: op {op!r} not supported")
        nodes[name] = graph.create_node(op, target, args, kwargs, name=name)
    graph.lint()
    return fx.GraphModule(root, graph)


def _to_device(t: torch.Tensor, device: str, target: str) -> torch.Tensor:
    """The stored tensor back where it was compiled (safetensors loads to the CPU): a CUDA graph left
    with CPU weights would copy them to the GPU on every call."""
    try:
        return t.to(torch.device(device))
    except Exception as e:  # noqa: BLE001 - e.g. no CUDA in this process: the entry is unusable here
        raise NotSerializable(f"tensor {target} was stored from {device}, which this process cannot use "
                              f"({type(e).__name__}: {str(e)[:120]})") from e


def graph_json_target_names(obj: dict) -> list[str]:
    """The call_function targets a stored graph needs (to check ops are registered before loading)."""
    return sorted({r["target"] for r in obj.get("nodes", []) if r.get("op") == "call_function"})


__all__ = ["NotSerializable", "graph_to_json", "graph_from_json", "target_to_str", "resolve_target",
           "graph_json_target_names"]
