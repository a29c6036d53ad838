"""Global switches, all read from EFFCOMPILE_* environment variables at the time they are needed."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("effcompile")


def debug_level() -> int:
    """EFFCOMPILE_DEBUG: 0 quiet, 1 passes and counts, 2 graphs after each pass, 3 kernels, 4 kernel source."""
    raw = os.environ.get("EFFCOMPILE_DEBUG", "0")
    try:
        level = int(raw)
    except ValueError:
        raise ValueError(f"EFFCOMPILE_DEBUG must be an integer 0-4, got {raw!r}") from None
    if level > 0 and not log.handlers:
        # A debug level is a request to see output: attach a handler if the user has none.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[effcompile] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return level


def checks_enabled() -> bool:
    """EFFCOMPILE_CHECKS=1: lint the graph and check IR invariants after every pass (on in CI)."""
    return os.environ.get("EFFCOMPILE_CHECKS", "0") not in ("", "0", "false", "False")


def cache_enabled() -> bool:
    """EFFCOMPILE_CACHE=0 turns the on-disk cache off (the in-memory one stays)."""
    return os.environ.get("EFFCOMPILE_CACHE", "1") not in ("", "0", "false", "False")
