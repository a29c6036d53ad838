"""Readable pass specs: ``"quantize(weights=int4,group_size=64)+remove_dropout"`` -> pass configs, and sweep grids."""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PassSpec", "SpecError", "config_fields", "expand_sweep", "format_spec", "parse_passes", "pass_names",
           "snake_case"]

_NONE_WORDS = ("", "none", "dense")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """A pass spec that cannot be parsed or validated; the message names the bad part and the valid ones."""


@dataclass(frozen=True)
class PassSpec:
    """One parsed ``name(field=value, ...)`` item, before (or after) grid expansion."""

    name: str
    cls: type
    kwargs: tuple[tuple[str, Any], ...]  # in the order written; list values are sweep axes

    def label(self) -> str:
        if not self.kwargs:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_fmt(v)}" for k, v in self.kwargs) + ")"


def snake_case(name: str) -> str:
    """``RemoveDropout`` -> ``remove_dropout``; ``INT8Quant`` -> ``int8_quant``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def pass_names() -> dict[str, type]:
    """Spec name -> config class for every registered pass: its snake_case name and any ``spec_name`` aliases."""
    import effcompile.passes as passes
    from effcompile.compiler.pass_manager import registered_passes

    passes.load_plugins()  # third-party passes become spec names too
    from effcompile.compiler.pipeline import default_passes

    default_passes()  # imports the default pipeline's passes (fuse_*), so a spec can configure them too
    names: dict[str, type] = {}
    clashes: dict[str, set[type]] = {}
    for cls in sorted(registered_passes(), key=lambda c: c.__name__):
        alias = getattr(cls, "spec_name", None)
        aliases = [alias] if isinstance(alias, str) else list(alias or ())
        for n in [snake_case(cls.__name__), *aliases]:
            if names.get(n, cls) is not cls:
                clashes.setdefault(n, {names[n]}).add(cls)
            names[n] = cls
    for n, classes in clashes.items():  # an ambiguous name must not silently pick one of the passes
        names[n] = _Ambiguous(n, sorted(c.__name__ for c in classes))
    return names


class _Ambiguous:
    def __init__(self, name: str, classes: list[str]):
        self.name, self.classes = name, classes


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a spec may set: the config's init fields (ClassVars like ``lossy`` are not fields)."""
    return [f for f in dataclasses.fields(cls) if f.init]


# ----------------------------------------------------------------------------- lexing
def _split_top(text: str, sep: str, what: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes (so ``1e+3`` inside parentheses stays whole)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced {ch!r} in {what} {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise SpecError(f"unclosed {'quote' if quote else 'bracket'} in {what} {text!r}")
    parts.append(text[start:])
    return parts


def _scalar(tok: str) -> Any:
    """int, float, bool, None, a quoted string, else the bare word as a string."""
    t = tok.strip()
    if not t:
        raise SpecError("empty value")
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _value(tok: str, sweep: bool) -> Any:
    t = tok.strip()
    if t.startswith("[") and t.endswith("]"):
        if not sweep:
            raise SpecError(f"{t}: [a,b] lists are sweep axes (use --sweep); write a tuple value as (a,b)")
        items = [_value(x, sweep=False) for x in _split_top(t[1:-1], ",", "list")]
        if not items:
            raise SpecError("empty sweep list []")
        return list(items)
    if t.startswith("(") and t.endswith(")"):
        parts = _split_top(t[1:-1], ",", "tuple")
        if len(parts) > 1 and not parts[-1].strip():
            parts = parts[:-1]  # (a,) is a one-element tuple, as in Python
        return tuple(_value(x, sweep=False) for x in parts) if t[1:-1].strip() else ()
    return _scalar(t)


def _coerce(field: dataclasses.Field, raw: str, value: Any) -> Any:
    """Respect an obvious annotation: ``str`` fields keep the text as written, ``float`` fields take ints."""
    ann = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if value is None:
        return None
    if ann == "str" and not isinstance(value, str) and not raw.strip().startswith(("(", "[")):
        return raw.strip()
    if ann == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ----------------------------------------------------------------------------- parsing
def _parse_item(item: str, names: dict[str, type], sweep: bool) -> PassSpec:
    text = item.strip()
    m = re.match(r"^([^()\s]+)\s*(?:\((.*)\))?$", text, re.S)
    if not m:
        raise SpecError(f"cannot parse pass {text!r}: expected name or name(field=value,...)")
    name, body = m.group(1), m.group(2)
    cls = names.get(name)
    if cls is None or not _NAME.match(name):
        public = sorted(n for n in names if not n.startswith("_"))  # _Private configs are test/internal passes
        raise SpecError(f"unknown pass {name!r}; valid: {', '.join(public)}")
    if isinstance(cls, _Ambiguous):
        raise SpecError(f"pass name {name!r} is ambiguous: claimed by {', '.join(cls.classes)}")
    fields = {f.name: f for f in config_fields(cls)}
    kwargs: list[tuple[str, Any]] = []
    for kv in (_split_top(body, ",", f"pass {name!r}") if body and body.strip() else []):
        if "=" not in kv:
            raise SpecError(f"{name}: {kv.strip()!r} is not field=value; fields: {', '.join(fields) or '(none)'}")
        key, raw = (s.strip() for s in kv.split("=", 1))
        if key not in fields:
            raise SpecError(f"{name} has no field {key!r}; fields: {', '.join(fields) or '(none)'}")
        if any(k == key for k, _ in kwargs):
            raise SpecError(f"{name}: field {key!r} given twice")
        try:
            value = _value(raw, sweep)
        except SpecError as e:
            raise SpecError(f"{name}.{key}: {e}") from None
        if isinstance(value, list):
            value = [_coerce(fields[key], str(v) if isinstance(v, str) else repr(v), v) for v in value]
        else:
            value = _coerce(fields[key], raw, value)
        kwargs.append((key, value))
    return PassSpec(name, cls, tuple(kwargs))


def _build(spec: PassSpec):
    try:
        return spec.cls(**dict(spec.kwargs))
    except (ValueError, TypeError) as e:  # the config validates its own values and names the field
        raise SpecError(f"{spec.label()}: {e}") from None


def _items(text: str | None, sweep: bool) -> list[PassSpec]:
    if text is None or text.strip().lower() in _NONE_WORDS:
        return []
    names = pass_names()
    return [_parse_item(item, names, sweep) for item in _split_top(text, "+", "pass spec")]


def parse_passes(text: str | None) -> tuple[str, list]:
    """``(canonical spec, [config, ...])``; ``"none"``/empty -> ``("none", [])`` (the dense baseline)."""
    specs = _items(text, sweep=False)
    configs = [_build(s) for s in specs]
    return format_spec(specs), configs


def format_spec(specs: list[PassSpec]) -> str:
    return "+".join(s.label() for s in specs) or "none"


def expand_sweep(text: str) -> tuple[list[tuple[str, list]], list[tuple[str, str]]]:
    """Grid points of a sweep spec: ``([(spec, configs), ...], [(spec, why invalid), ...])``.

    Every ``[a,b]`` list is an axis; the grid is their product (in the order written). Points whose
    configs reject the combination (e.g. int8 with a group size) are returned as invalid, not run.
    """
    specs = _items(text, sweep=True)
    if not specs:
        raise SpecError("--sweep needs at least one pass, e.g. quantize(weights=[int8,int4])")
    axes = [(i, k, v) for i, s in enumerate(specs) for k, v in s.kwargs if isinstance(v, list)]
    if not axes:
        raise SpecError(f"sweep {text!r} has no [a,b] list to sweep over")
    points, invalid = [], []
    for combo in itertools.product(*(v for _, _, v in axes)):
        chosen = {(i, k): val for (i, k, _), val in zip(axes, combo, strict=True)}
        point = [PassSpec(s.name, s.cls, tuple((k, chosen.get((i, k), v)) for k, v in s.kwargs))
                 for i, s in enumerate(specs)]
        label = format_spec(point)
        try:
            points.append((label, [_build(p) for p in point]))
        except SpecError as e:
            invalid.append((label, str(e)))
    return points, invalid


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if v is None:
        return "None"
    return str(v)
