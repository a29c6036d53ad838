"""Greedy allocation of ThresholdChannels' sparsity across layers: per-group error curves, then the cheapest steps."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from effcompile.passes.calibration import padding_mask, real_rows, run_node, start_run

GREEDY_METRICS = ("cosine", "pooled", "mse")
NO_THRESHOLD = -1.0  # |x| > -1 always: the greedy search's "this layer dense" value


def _float_leaves(out) -> list[torch.Tensor]:
    return [t.float() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _outputs(gm: fx.GraphModule, args) -> list[torch.Tensor]:
    return _float_leaves(gm(*args))


def _distance(out: torch.Tensor, ref: torch.Tensor, metric: str, mask: torch.Tensor | None = None) -> float:
    """How far one output is from dense. "cosine": 1 - cos per row of the last dimension (a token's
    hidden state, a row of logits), averaged over rows whose reference is not zero; "pooled": a
    [batch, seq, hidden] output is first averaged over each sequence's real positions (one row per
    sequence), other outputs are taken as they are; outputs without rows (scalars, a last dimension of 1)
    and "mse" take the relative squared error. mask: the batch's real positions; rows at padding
    positions are left out."""
    if metric == "pooled" and out.dim() == 3:
        w = torch.ones(out.shape[:2]) if mask is None or tuple(out.shape[:2]) != tuple(mask.shape) else mask
        w = w.to(out.device, out.dtype)[..., None]
        out, ref = (out * w).sum(1) / w.sum(1).clamp_min(1), (ref * w).sum(1) / w.sum(1).clamp_min(1)
    else:
        out, ref = real_rows(out, mask), real_rows(ref, mask)
    if metric in ("cosine", "pooled") and out.dim() >= 2 and out.shape[-1] > 1:
        o, r = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
        r_norm = r.norm(dim=-1)
        live = r_norm > 0
        if bool(live.any()):
            if not bool(live.all()):  # (indexing copies both: a logits-sized copy per point of greedy's curves)
                o, r, r_norm = o[live], r[live], r_norm[live]
            # cosine_similarity's value from the reference norms the live check needs anyway: 2.4x faster on a
            # stdlib-LM logits batch (1016 x 4096), where it was 14 % of the greedy search
            cos = torch.linalg.vecdot(o, r) / (o.norm(dim=-1) * r_norm).clamp_min(1e-8)
            return float(1 - cos.mean())
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def _score(outputs, batches, refs, metric: str, skip_padding: bool, gm) -> float:
    """The distance of every float output from dense (summed over outputs), averaged over batches; outputs[i]
    holds batch i's float outputs, as _outputs gives them."""
    total = 0.0
    for outs, args, ref in zip(outputs, batches, refs, strict=True):
        pairs = list(zip(outs, ref, strict=True))
        if metric == "pooled" and any(o.dim() == 3 for o, _ in pairs):
            # Sentence embeddings come from the token-level output; a pooled head beside it (BERT's
            # pooler, tanh of the first token) is another use, and scoring it too made greedy lose to
            # uniform on MiniLM retrieval (measured, docs/thresholding.md).
            pairs = [(o, r) for o, r in pairs if o.dim() == 3]
        mask = padding_mask(gm, args) if skip_padding else None
        total += sum(_distance(o, r, metric, mask) for o, r in pairs)
    return total / max(len(batches), 1)


def _error(gm, batches, refs, metric: str, skip_padding: bool = False) -> float:
    """The distance from dense of the whole graph's outputs on ``batches`` (see _score)."""
    return _score([_outputs(gm, args) for args in batches], batches, refs, metric, skip_padding, gm)


class _Resumable:
    """One batch run through ``gm`` a node at a time, paused before a chosen node; ``rest()`` runs the graph from
    there to its outputs as often as asked (with other thresholds each time), so what comes before the pause is
    computed once, not once per run."""

    def __init__(self, gm: fx.GraphModule, args):
        self.gm, self.nodes, self.at = gm, list(gm.graph.nodes), 0
        self.walk, self.again = start_run(gm, args), fx.Interpreter(gm)
        # Storage of the weights and inputs (dynamo can pass parameters as inputs): a computed value that is a view
        # of one (a transposed weight) is not copied for each run; the graph does not write into its weights.
        self.fixed = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers(), *args]
                      if isinstance(t, torch.Tensor)}

    def pause_before(self, index: int) -> None:
        """Run the nodes up to (not including) ``index``; values no later node reads are dropped."""
        for node in self.nodes[self.at:index]:
            run_node(self.walk, node)
        self.at = max(self.at, index)

    def rest(self) -> list[torch.Tensor]:
        """The graph's float outputs (as _outputs), running the nodes from the pause on. The values computed
        before it are copied first: an in-place op downstream must not change what the next run starts from."""
        self.again.env = self.start()
        out = None
        for node in self.nodes[self.at:]:
            out = run_node(self.again, node)
        return _float_leaves(self.gm.graph.process_outputs(out))

    def start(self) -> dict:
        """The values at the pause, computed ones copied (not views of weights or inputs)."""
        return {n: v.clone() if n.op.startswith("call") and isinstance(v, torch.Tensor)
                and v.untyped_storage().data_ptr() not in self.fixed else v for n, v in self.walk.env.items()}


def _curves(gm, groups: dict[tuple, list], bufs, calib, levels: list[float], batches, refs, metric: str,
            skip_padding: bool) -> dict[tuple, list[float]]:
    """Each group's error at each level with every other group dense: groups in graph order, each batch run once
    up to the group's first sparsify, then from there once per level (on average half the graph per level,
    where running the whole graph each time cost twice as much). Equal to _error of each setting."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = {g: min(order[s.sparsify] for s in members) for g, members in groups.items()}
    runs = [_Resumable(gm, args) for args in batches]
    curves: dict[tuple, list[float]] = {}
    for g in sorted(groups, key=start.__getitem__):
        for r in runs:
            r.pause_before(start[g])
        errs = [0.0]
        for lv in levels[1:]:
            for s in groups[g]:
                bufs[s.label].copy_(calib.threshold(s, lv))
            errs.append(_score([r.rest() for r in runs], batches, refs, metric, skip_padding, gm))
        for s in groups[g]:
            bufs[s.label].fill_(NO_THRESHOLD)
        curves[g] = errs
    return curves


def allocate(gm, sites, bufs, calib, cfg, ctx) -> tuple[dict[str, float], dict]:
    """Per-site sparsity: each (block, kind) group's error curve is measured alone, then the group with
    the least error per skipped weight byte is raised until each target is met (TEAL's greedy search,
    with the separable approximation that keeps it to groups x levels forward passes)."""
    batches = list(ctx.calibration)[: cfg.greedy_batches]
    for b in bufs.values():
        b.fill_(NO_THRESHOLD)
    with torch.no_grad():
        refs = [_outputs(gm, a) for a in batches]
        groups: dict[tuple, list] = {}
        for s in sites:
            groups.setdefault((s.tag.block, s.kind), []).append(s)
        top = max(cfg.target_for(s.kind) for s in sites)
        levels = [round(i * cfg.greedy_step, 6) for i in range(1, int(0.95 / cfg.greedy_step + 1e-9) + 1)]
        levels = [0.0] + levels + ([top] if top > levels[-1] else [])
        curves = _curves(gm, groups, bufs, calib, levels, batches, refs, cfg.greedy_metric, cfg.skip_padding)
    weight = {g: sum(s.elements for s in m) for g, m in groups.items()}
    level = {g: 0.0 for g in groups}
    # One budget per constraint: model-wide, or one per kind when the targets are per kind.
    per_kind = not isinstance(cfg.sparsity, float)
    budgets: dict[str, list[tuple]] = {}
    for g in groups:
        budgets.setdefault(g[1] if per_kind else "all", []).append(g)
    for gs in budgets.values():
        target = cfg.target_for(gs[0][1]) * sum(weight[g] for g in gs)
        idx = {g: 0 for g in gs}
        done = 0.0
        while done < target - 1e-9:
            best = None
            for g in gs:  # any jump ahead, so a non-convex error curve does not trap the search
                i = idx[g]
                for j in range(i + 1, len(levels)):
                    cost = (curves[g][j] - curves[g][i]) / (weight[g] * (levels[j] - levels[i]))
                    if best is None or cost < best[0]:
                        best = (cost, g, j)
            if best is None:
                break
            _, g, j = best
            gain = weight[g] * (levels[j] - levels[idx[g]])
            if done + gain > target:  # the last step lands exactly on the target
                level[g] = levels[idx[g]] + (target - done) / weight[g]
                done = target
            else:
                level[g], idx[g], done = levels[j], j, done + gain
    alloc = {s.label: level[(s.tag.block, s.kind)] for s in sites}
    # The separable model can be wrong; check on the calibration data and keep uniform if it lost.
    with torch.no_grad():
        for s in sites:
            bufs[s.label].copy_(calib.threshold(s, alloc[s.label]))
        err_greedy = _error(gm, batches, refs, cfg.greedy_metric, cfg.skip_padding)
        for s in sites:
            bufs[s.label].copy_(calib.threshold(s, cfg.target_for(s.kind)))
        err_uniform = _error(gm, batches, refs, cfg.greedy_metric, cfg.skip_padding)
    info = {"calibration_error_greedy": err_greedy, "calibration_error_uniform": err_uniform,
            "levels": len(levels) - 1, "groups": len(groups)}
    if err_greedy > err_uniform:
        info["fallback"] = "greedy allocation lost to uniform on the calibration data; kept uniform"
        alloc = {s.label: cfg.target_for(s.kind) for s in sites}
    return alloc, info
