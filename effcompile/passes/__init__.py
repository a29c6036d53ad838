"""Graph rewrites: each pass is a frozen config plus a pure function, registered by config type.

Three ways to write one (see docs/passes.md):

* declarative - :func:`rewrite` a pattern into a replacement, both written as eager PyTorch functions;
* imperative  - :func:`register_pass` a function ``fn(gm, cfg, ctx) -> PassResult``;
* calibrated  - an imperative pass that reads statistics gathered by :mod:`effcompile.passes.calibration`.

Passes import ``effcompile.compiler`` only - never codegen or triton (a test enforces it).
"""

from __future__ import annotations

import importlib.metadata
import logging

from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes.early_exit import EarlyExit
from effcompile.passes.merge_tokens import MergeTokens
from effcompile.passes.patterns import pattern, rewrite
from effcompile.passes.prune_tokens import PruneTokens
from effcompile.passes.quantize import Quantize
from effcompile.passes.remove_dropout import RemoveDropout
from effcompile.passes.skip_layers import SkipLayers
from effcompile.passes.threshold_channels import ThresholdChannels

__all__ = [
    "EarlyExit",
    "MergeTokens",
    "PassConfig",
    "PassContext",
    "PassResult",
    "PruneTokens",
    "Quantize",
    "RemoveDropout",
    "SkipLayers",
    "ThresholdChannels",
    "load_plugins",
    "pattern",
    "register_pass",
    "rewrite",
]

log = logging.getLogger("effcompile.passes")
_PLUGINS_LOADED = False


def load_plugins() -> list[str]:
    """Import third-party passes from the ``effcompile.passes`` entry-point group (once, lazily)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return []
    _PLUGINS_LOADED = True
    loaded = []
    for ep in importlib.metadata.entry_points(group="effcompile.passes"):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as e:  # a broken plugin must not break compilation of everything else
            log.warning("effcompile.passes plugin %r failed to load: %s", ep.name, e)
    return loaded
