"""What explain() shows: per compiled graph, the passes, kernels, cache outcome and fallbacks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GraphReport:
    """One dynamo graph compiled by effcompile (a model with graph breaks has several)."""

    index: int
    fingerprint: str
    nodes: int
    sublayers: dict[str, int] = field(default_factory=dict)
    passes: list[Any] = field(default_factory=list)  # compiler.pass_manager.PassRecord
    kernels: list[Any] = field(default_factory=list)  # codegen KernelRecord
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    cache: str = "off"  # "miss", "memory hit", "disk hit", "off", "not cacheable"
    cache_note: str = ""
    key_digest: str = ""
    key_fields: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0
    buckets: list[str] = field(default_factory=list)
    recompiles: list[str] = field(default_factory=list)
    calls: int = 0
    param_ids: frozenset[int] = frozenset()  # ids of the real parameters fed to this graph
    # Weak references to the compiled GraphModules (one per shape bucket), for runtime-tunable buffers
    # such as thresholds; see graph_modules().
    modules: list[Any] = field(default_factory=list, repr=False, compare=False)

    def graph_modules(self) -> list[Any]:
        """The compiled GraphModules still alive."""
        return [m for m in (r() for r in self.modules) if m is not None]

    def kernel_paths(self) -> dict[str, str]:
        """Which implementation each kernel's op ran: "triton", "torch" or "not run yet"."""
        from effcompile.codegen import ops

        out = {}
        for k in self.kernels:
            counts = ops.PATH_COUNTS.get(k.name, {})
            ran = [p for p in ("triton", "torch") if counts.get(p)]
            out[k.name] = "+".join(ran) if ran else "not run yet"
        return out


@dataclass
class Report:
    """``effcompile.explain(compiled)``: a readable table via ``str()``; fields for programs."""

    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # whole-call fallbacks to eager, with reasons
    notes: list[str] = field(default_factory=list)  # what the compiler chose not to do, and why

    @property
    def kernels(self) -> list[Any]:
        return [k for g in self.graphs for k in g.kernels]

    def fired(self) -> dict[str, int]:
        """Rewrite counts per pass name, summed over graphs."""
        counts: Counter[str] = Counter()
        for g in self.graphs:
            for p in g.passes:
                counts[p.name] += p.count
        return dict(counts)

    def kernels_by_block(self) -> dict[str, list[str]]:
        """Kernel names per sublayer tag (e.g. "layers.3.ffn")."""
        out: dict[str, list[str]] = {}
        for k in self.kernels:
            for tag in k.sublayers:
                out.setdefault(tag, []).append(k.name)
        return out

    def __str__(self) -> str:
        lines = [f"effcompile report: {len(self.graphs)} graph(s), {len(self.graph_breaks)} graph break(s)"]
        for reason in self.graph_breaks:
            lines.append(f"  graph break: {reason}")
        for reason in self.fallbacks:
            lines.append(f"  FALLBACK to eager: {reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for g in self.graphs:
            lines.append("")
            lines.append(
                f"graph {g.index}  fingerprint {g.fingerprint[:12]}  {g.nodes} nodes  "
                f"compiled in {g.compile_seconds:.2f}s  calls {g.calls}"
            )
            lines.append(f"  cache: {g.cache}" + (f" ({g.cache_note})" if g.cache_note else "")
                         + (f"  key {g.key_digest[:16]}" if g.key_digest else ""))
            if g.key_fields:
                short = {k: v for k, v in g.key_fields.items() if k not in ("inputs", "passes")}
                lines.append(f"    key fields: {short}")
            if g.buckets:
                lines.append(f"  shape buckets: {', '.join(g.buckets)}")
            for r in g.recompiles:
                lines.append(f"  recompiled: {r}")
            lines.append(f"  {'pass':<24} {'phase':<12} {'fired':<6} {'count':>5}  where")
            for p in g.passes:
                where = ", ".join(p.where[:4]) + (" ..." if len(p.where) > 4 else "")
                fired = "yes" if p.modified else ("skip" if not p.ran else "no")
                detail = where + (f"  [{p.note}]" if where and p.note else p.note if not where else "")
                lines.append(f"  {p.name:<24} {p.phase:<12} {fired:<6} {p.count:>5}  {detail}")
                from effcompile.compiler.sparse_ops import explain_lines  # per-layer thresholds + achieved

                lines.extend(explain_lines(p.artifacts))
            paths = g.kernel_paths() if g.kernels else {}
            lines.append(f"  kernels: {len(g.kernels)}")
            for k in g.kernels:
                blocks = ", ".join(k.sublayers[:3]) + (" ..." if len(k.sublayers) > 3 else "")
                lines.append(f"    {k.name:<28} {k.kind:<10} ran={paths.get(k.name, '?'):<12} "
                             f"[{'+'.join(k.ops)}]  in {blocks}")
                lines.append(f"      source: {k.source_path}")
            for what, why in g.fallbacks:
                lines.append(f"  not fused: {what}: {why}")
        if shapes := self.launch_shapes():
            lines.append("")
            lines.append("decode kernel launch shapes chosen on the GPU in this process (codegen/kernels/tuning):")
            for (key, shape), (config, source) in shapes.items():
                tile = tuple(config) if config is not None else "built-in"
                lines.append(f"  {key}{'' if shape is None else f' {shape[0]}x{shape[1]}'}: {tile}  from {source}")
        from effcompile.codegen import ops as cg_ops

        if cg_ops.PDL_SEEN:  # a process-wide launch mode that changes how every kernel runs: say which
            lines.append("")
            lines.append("effcompile kernels launched on " + ", ".join(
                f"{dev} {'with' if on else 'without'} programmatic dependent launch"
                for dev, on in sorted(cg_ops.PDL_SEEN.items())) + " (EFFCOMPILE_PDL=0: without; codegen/README.md)")
        return "\n".join(lines)

    @staticmethod
    def launch_shapes() -> dict:
        """(kernel/format/bucket, (N, K)) -> (launch_plan.Config or None for the built-in tiles, its source), for
        every decode kernel launched on a GPU in this process so far."""
        from effcompile.codegen.kernels import launch_plan

        return dict(launch_plan.CHOSEN)
