"""Calibration: statistics of chosen activations, gathered by running the graph over calibration data.

``effcompile(model, calibration=batches)`` first runs every batch through the captured graphs and
records each graph's inputs; a calibrated pass then calls :func:`collect_stats` with the nodes it cares
about and gets per-node :class:`ActivationStats` (per-channel abs-max, mean |x|, a sample of |x| for
quantiles). Its decisions go into ``PassResult.artifacts`` so explain() and the cache key see them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from effcompile.compiler.pass_manager import PassContext
from effcompile.runtime.key import TensorMemo


@dataclass
class ActivationStats:
    """Running statistics of one activation over all calibration batches (last dim = channels)."""

    count: int = 0
    absmax: torch.Tensor | None = None  # per channel
    abs_sum: torch.Tensor | None = None  # per channel
    sample: list[torch.Tensor] = field(default_factory=list)  # |x| values, for quantiles
    sample_size: int = 65536
    # Optional uniform sample of whole rows of |x| (tokens x channels) over *all* batches, for statistics
    # that need to know which channel a value came from (per-channel thresholds). 0 = off.
    row_sample_size: int = 0
    rows: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().reshape(-1, x.shape[-1])
        amax, asum = a.amax(0), a.sum(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.abs_sum = asum if self.abs_sum is None else self.abs_sum + asum
        self.count += a.shape[0]
        have = sum(s.numel() for s in self.sample)
        if have < self.sample_size:
            flat = a.flatten()
            # A fixed-seed subsample keeps calibration deterministic (the result is a cache-key part).
            g = torch.Generator().manual_seed(self.count)
            take = flat[torch.randperm(flat.numel(), generator=g)[: self.sample_size - have]]
            self.sample.append(take)
        if self.row_sample_size:
            self._reservoir(a)

    def _reservoir(self, a: torch.Tensor) -> None:
        # Reservoir sampling (algorithm R, vectorized): every row seen so far is equally likely to be
        # kept, so late batches count as much as early ones. Fixed seeds keep calibration deterministic.
        seen = self.count - a.shape[0]
        cap = self.row_sample_size
        if self.rows is None:
            self.rows = a[:cap].clone()
            a, seen = a[cap:], min(a.shape[0], cap)
        elif self.rows.shape[0] < cap:
            room = cap - self.rows.shape[0]
            self.rows = torch.cat([self.rows, a[:room]])
            a, seen = a[room:], seen + min(a.shape[0], room)
        if a.shape[0] == 0:
            return
        g = torch.Generator().manual_seed(seen)
        idx = torch.arange(seen, seen + a.shape[0])
        slot = (torch.rand(a.shape[0], generator=g, dtype=torch.float64) * (idx + 1)).long()
        hit = slot < cap
        # Of rows drawing the same slot in one batch the latest wins, as in the sequential algorithm
        # (an explicit winner: index_put with duplicate indices does not promise which write lands).
        winner = torch.full((cap,), -1, dtype=torch.long).scatter_reduce(0, slot[hit], torch.nonzero(hit)[:, 0], "amax")
        won = winner >= 0
        self.rows[won] = a[winner[won]]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def quantile(self, q: float) -> float:
        """The q-quantile of |x| over the sample (q in [0, 1])."""
        if not self.sample:
            raise ValueError("no calibration data was recorded for this activation")
        return float(torch.quantile(torch.cat(self.sample)[:16_000_000], q))


def padding_mask(gm: fx.GraphModule, args) -> torch.Tensor | None:
    """Which positions of a calibration batch are real tokens (True) and which are padding: the graph input
    named ``attention_mask`` (Hugging Face's convention; dynamo calls it ``l_kwargs_attention_mask_``) when
    it is a 2-D integer or bool [batch, seq] tensor with at least one padding position, else None."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args, strict=False):
        if ("attention_mask" in node.name and isinstance(value, torch.Tensor) and value.dim() == 2
                and not value.is_floating_point() and not bool(value.all())):
            return value.bool()
    return None


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x's rows at real (non-padding) positions, [n, channels], when x is [batch, seq, channels] shaped like
    mask; otherwise x unchanged (a tensor not laid out by position, e.g. a pooled output)."""
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


# Results already calibrated in this process, by the model's weight tensor (weakly) and a key the pass
# chooses (its config and the layer). A decode graph (one token, a KV cache) gets no recordings from
# prefill-shaped calibration batches; its linears read the same weights and see the same per-token
# activations, so it reuses what the graph that had data calibrated (thresholds, smoothing scales, EoRA
# factors).
_DONE = TensorMemo()


def calibrated_for(weight: torch.Tensor) -> dict:
    """The mutable record of what was calibrated for this weight tensor, as it is now, so far in this process: fit_key
    -> a tuple of tensors and JSON values (so export_fits can store it in a cache entry). A weight changed in place
    since (load_state_dict: its _version, or new storage) starts an empty record: fits made for its old values are
    never reused for the new ones."""
    record = _DONE.get(weight)
    return record if record is not None else _DONE.put(weight, {})


def fit_key(kind: str, cfg, label: str = "") -> str:
    """The registry key of one fit: its kind, the pass config (canonical JSON) and the layer label."""
    from effcompile.runtime.key import config_json

    return f"{kind}|{config_json(cfg)}|{label}"


def export_fits(params: dict[str, torch.Tensor]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The registry entries of these weights as (JSON records, tensors), for a calibrated graph's cache
    entry: a later process that loads that graph from the disk gets them back (import_fits), so a graph
    it compiles without calibration data (a new decode shape) still has the fits to reuse."""
    records, tensors = [], {}
    for name, weight in params.items():
        for key, value in calibrated_for(weight).items():
            items = []
            for v in value:
                if isinstance(v, torch.Tensor):
                    tname = f"__fit{len(tensors)}"
                    tensors[tname] = v
                    items.append({"tensor": tname})
                else:
                    items.append({"value": v})
            records.append({"param": name, "key": key, "items": items})
    return records, tensors


def import_fits(records: list[dict], tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> int:
    """Put stored fits back into the registry, each tensor on its weight's device; returns how many.
    Records for weights this graph does not have, or with a missing tensor, are skipped: the registry
    only serves reuse, and a graph without data and without a fit raises the calibration error."""
    done = 0
    for rec in records:
        weight = params.get(rec.get("param"))
        items = rec.get("items")
        if weight is None or not isinstance(items, list):
            continue
        if any("tensor" in i and i["tensor"] not in tensors for i in items):
            continue
        calibrated_for(weight)[rec["key"]] = tuple(
            tensors[i["tensor"]].to(weight.device) if "tensor" in i else i.get("value") for i in items)
        done += 1
    return done


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[str], stats: dict[str, ActivationStats], rows: int = 0,
                 mask: torch.Tensor | None = None):
        super().__init__(gm)
        self.watch, self.stats, self.rows, self.mask = watch, stats, rows, mask

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            self.stats.setdefault(n.name, ActivationStats(row_sample_size=self.rows)).update(real_rows(out, self.mask))
        return out


def _no_data_error() -> ValueError:
    return ValueError(
        "this pass needs calibration data, but this graph received none: pass "
        "effcompile(model, calibration=[batch, ...]) with batches shaped like real inputs. If the model's weights "
        "changed since it was calibrated (load_state_dict), call it first with inputs shaped like the calibration "
        "batches (the prefill): that graph fits again, and the others (decode steps) reuse its fits"
    )


def collect_stats(
    gm: fx.GraphModule,
    ctx: PassContext,
    select: Callable[[fx.Node], bool] | Iterable[fx.Node],
    *,
    desc: str = "calibrating",
    rows: int = 0,
    skip_padding: bool = False,
) -> dict[str, ActivationStats]:
    """Run ``gm`` over the recorded calibration inputs; return stats of the selected nodes' outputs.

    ``select`` is a node predicate or a list of nodes; ``rows`` > 0 also keeps a uniform sample of that
    many whole rows of |x| per node (``ActivationStats.rows``); ``skip_padding`` leaves out the rows at
    padding positions (:func:`padding_mask`) of activations laid out [batch, seq, channels]. Raises
    ValueError when the graph saw no calibration data (the message says how to give some).
    """
    from tqdm.auto import tqdm

    if not ctx.calibration:
        raise _no_data_error()
    nodes = [n for n in gm.graph.nodes if select(n)] if callable(select) else list(select)
    watch = {n.name for n in nodes}
    stats: dict[str, ActivationStats] = {}
    batches = list(ctx.calibration)
    with torch.no_grad():
        for args in tqdm(batches, desc=desc, leave=False):
            _Recorder(gm, watch, stats, rows, padding_mask(gm, args) if skip_padding else None).run(*args)
    return stats


def start_run(gm: fx.GraphModule, args) -> fx.Interpreter:
    """An interpreter of ``gm`` set up to run one batch node by node with :func:`run_node` (placeholders
    take ``args``)."""
    run = fx.Interpreter(gm)
    run.env, run.args_iter = {}, iter(gm.graph.process_inputs(*args))
    return run


def run_node(run: fx.Interpreter, node: fx.Node):
    """Run one node into ``run.env``, then drop the values no later node reads (as fx.Interpreter.run does);
    returns the node's value."""
    run.env[node] = value = run.run_node(node)
    for dead in run.user_to_last_uses.get(node, []):
        del run.env[dead]
    return value


def _node_by_node(gm: fx.GraphModule, args):
    """Run ``gm`` on one batch a node at a time: yields (node, its value) after each node (values no later
    node reads already dropped; the node's own is passed on even when nothing reads it)."""
    run = start_run(gm, args)
    for node in gm.graph.nodes:
        yield node, run_node(run, node)


def run_in_order(
    gm: fx.GraphModule,
    ctx: PassContext,
    nodes: Iterable[fx.Node],
    on_ready: Callable[[str, list[torch.Tensor]], None],
    *,
    desc: str = "calibrating in order",
) -> None:
    """Run the calibration batches through ``gm`` in lockstep, node by node; once a watched node's output is
    known for every batch, ``on_ready(name, [its value in each batch])`` runs before any later node does. What
    it writes into a buffer is then what every batch's later nodes read, so one pass over the data fits each
    node with every node upstream already fitted: the fixed point that re-collecting with the fits in place only
    approaches, in one run of the model. Only one watched node's data needs to be reduced at a time (EoRA's
    covariances: one [K, K] matrix alive, not one per linear). The price is that the values still live at a
    node are held for all batches at once."""
    from tqdm.auto import tqdm

    if not ctx.calibration:
        raise _no_data_error()
    watch = {n.name for n in nodes}
    batches = list(ctx.calibration)
    with torch.no_grad():
        for step in tqdm(zip(*(_node_by_node(gm, args) for args in batches), strict=True), total=len(gm.graph.nodes),
                         desc=desc, leave=False):
            name = step[0][0].name
            if name in watch and all(isinstance(v, torch.Tensor) for _, v in step):
                on_ready(name, [v for _, v in step])


def collect_stats_in_order(
    gm: fx.GraphModule,
    ctx: PassContext,
    nodes: Iterable[fx.Node],
    on_ready: Callable[[str, ActivationStats], None],
    *,
    desc: str = "calibrating in order",
    rows: int = 0,
    skip_padding: bool = False,
) -> dict[str, ActivationStats]:
    """:func:`collect_stats` for fits that change the graph's own behaviour downstream (a threshold buffer):
    :func:`run_in_order`, with ``on_ready(name, stats)`` getting the node's statistics over every batch."""
    masks = [padding_mask(gm, args) if skip_padding else None for args in ctx.calibration or ()]
    stats: dict[str, ActivationStats] = {}

    def ready(name: str, values: list[torch.Tensor]) -> None:
        st = stats.setdefault(name, ActivationStats(row_sample_size=rows))
        for value, mask in zip(values, masks, strict=True):
            st.update(real_rows(value, mask))
        on_ready(name, st)

    run_in_order(gm, ctx, nodes, ready, desc=desc)
    return stats
