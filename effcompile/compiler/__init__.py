"""Capture, IR, pass manager and backend; importing it registers the IR ops (effcompile::wq_linear)."""

from effcompile.compiler import ops as _ops  # noqa: F401  (cached graphs name its ops)
