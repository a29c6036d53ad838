"""Every option of every registered pass is part of the cache key (future passes are covered too)."""

import dataclasses

import pytest

import effcompile  # noqa: F401  (registers the built-in passes)
from effcompile.compiler.pass_manager import registered_passes
from effcompile.runtime import key as K


def _default_instance(cfg_type):
    try:
        return cfg_type()
    except (TypeError, ValueError):
        return None


def _other_value(value):
    """A different value of a similar type (validation is bypassed: only the key is under test)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, tuple):
        return (*value, "x")
    if value is None:
        return 1
    return repr(value) + "_x"


CASES = [(t, f.name) for t, entry in sorted(registered_passes().items(), key=lambda kv: kv[1].name)
         if _default_instance(t) is not None for f in dataclasses.fields(t)]


def _identity(cfg, entry):
    return K.pass_identity(entry.name, type(cfg).version, entry.fn, cfg)


@pytest.mark.parametrize("cfg_type,field", CASES, ids=[f"{t.__name__}.{f}" for t, f in CASES])
def test_each_option_of_each_registered_pass_changes_the_key(cfg_type, field):
    entry = registered_passes()[cfg_type]
    base = _default_instance(cfg_type)
    changed = dataclasses.replace(base)
    object.__setattr__(changed, field, _other_value(getattr(base, field)))
    a = K.make_key(graph="g", inputs=[], passes=[_identity(base, entry)])
    b = K.make_key(graph="g", inputs=[], passes=[_identity(changed, entry)])
    assert a.digest != b.digest, f"{cfg_type.__name__}.{field} does not reach the cache key"


def test_the_built_in_options_are_covered():
    names = {f"{t.__name__}.{f}" for t, f in CASES}
    assert {"Quantize.weights", "Quantize.group_size", "Quantize.targets"} <= names
