"""Which weights a compiled graph was made from: the per-call check, the weight sets it keeps, per-model shared state."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from effcompile.runtime.key import tensor_state

MAX_WEIGHT_SETS = 4  # weight sets a graph keeps variants for: two models of one class alternating do not recompile


class WeightSets:
    """The parameters a graph's variants depend on, when a pass reads the weights (quantized copies, thresholds,
    packed layouts): the graph is only right for them as they were. Dynamo guards neither their identity nor their
    contents (they are graph inputs), so another instance of the model's class reuses the graph, and load_state_dict
    leaves it as it was: both ran silently on the old weights before. ``slots``: the argument positions of those
    parameters (none when no pass reads weights: nothing to check); ``names``: as the model names them."""

    def __init__(self, slots: list[int], names: list[str], args):
        self.slots, self.names = slots, names
        self.current = self.of(args)
        self._others: OrderedDict[tuple, object] = OrderedDict()  # weight set -> the graph's state for it

    def of(self, args) -> tuple:
        """The weight set a call passes: identity, contents version and storage of each parameter (~50 us for 146
        parameters on the 2-core box)."""
        return tuple((id(a), *tensor_state(a)) for a in (args[i] for i in self.slots))

    def changed(self, args) -> tuple | None:
        """The call's weight set if it is not the current one, else None."""
        if not self.slots:
            return None
        weights = self.of(args)
        return weights if weights != self.current else None

    def switch(self, old_args, args, weights: tuple, state) -> tuple[str, object | None]:
        """Make ``weights`` current; ``state`` is the graph's state for the current set. Returns why they differ
        (for explain()) and the state kept for ``weights``, or None (compile for them). Another model's state is
        kept for when it comes back; a set changed in place (same tensors) is stale, and dropped."""
        old = [old_args[i] for i in self.slots]
        new = [args[i] for i in self.slots]
        why = next(f"{name} is another tensor" if a is not b else f"{name} changed in place"
                   for name, b, a, w0, w1 in zip(self.names, old, new, self.current, weights, strict=True) if w0 != w1)
        if not all(a is b for a, b in zip(old, new, strict=True)):
            self._others[self.current] = state
        while len(self._others) > MAX_WEIGHT_SETS:
            self._others.popitem(last=False)
        self.current = weights
        return why, self._others.pop(weights, None)

    def swap(self, old_args, args) -> dict[int, torch.Tensor]:
        """id(old parameter) -> the new one, to rewrite the graph's inputs and parameter lists for a new set."""
        return {id(old_args[i]): args[i] for i in self.slots}


class _SharedState(dict):
    """PassContext.shared of the backend graphs over one model's weights (a dict subclass, so it can be held weakly)."""


_BACKEND_SHARED: dict[int, tuple] = {}  # id(parameter) -> (weakref to it, weakref to its graphs' _SharedState)


def backend_shared(params: dict[str, torch.Tensor]) -> dict:
    """The shared state of the backend graphs already compiled over any of these parameters, else a new one. The call
    form shares one per compiled model; the backend form sees only graphs, and a model's prefill and decode graphs
    each quantized and packed every weight (llama-1b int4: ~15 s and 0.7 GB a graph). Held by the graphs, weakly here,
    so it goes with the last graph that uses it."""
    state = None
    for p in params.values():
        ref = _BACKEND_SHARED.get(id(p))
        if ref is not None and ref[0]() is p and (state := ref[1]()) is not None:
            break
    state = _SharedState() if state is None else state
    if len(_BACKEND_SHARED) > 65536:  # forget freed parameters and states now and then
        for i in [i for i, (p, s) in _BACKEND_SHARED.items() if p() is None or s() is None]:
            del _BACKEND_SHARED[i]
    for p in params.values():
        _BACKEND_SHARED[id(p)] = (weakref.ref(p), weakref.ref(state))
    return state
