"""Peer variants measured in the same run as effcompile: TorchAO's weight-only quantization for Quantize specs,
and torch.compile by region (one decoder layer at a time)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch

# Linears inside transformer blocks (HF Llama "model.layers.3.", GPT-2 "transformer.h.3.", BERT "layer.3."):
# what Quantize's default targets (attn + ffn) select, so both sides quantize the same layers.
_IN_BLOCK = re.compile(r"(^|\.)(layers|h|layer)\.\d+\.")


def torchao_config(configs: list):
    """(TorchAO config, None) matching the spec's one Quantize, or (None, why there is no peer)."""
    from effcompile.passes.quantize import Quantize

    quant = [c for c in configs if isinstance(c, Quantize)]
    if len(quant) != 1 or len(configs) != 1:
        return None, "TorchAO is compared on a spec that is exactly one quantize(...)"
    q = quant[0]
    if set(q.targets) != {"attn", "ffn"}:
        return None, f"TorchAO's peer quantizes block linears; targets={list(q.targets)} has no equivalent"
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except Exception as e:  # noqa: BLE001 - an optional peer: its absence is recorded, not fatal
        return None, f"torchao is not importable: {type(e).__name__}: {e}"
    if q.weights == "int8":
        return Int8WeightOnlyConfig(), None
    # tile_packed_to_4d is TorchAO's tinygemm layout (CUDA, bf16): its default "plain" int4 needs fbgemm-gpu.
    return Int4WeightOnlyConfig(group_size=q.group_size, int4_packing_format="tile_packed_to_4d"), None


def build_torchao(model: torch.nn.Module, configs: list) -> tuple[Callable | None, str | None]:
    """A quantized copy of ``model`` under torch.compile, as TorchAO's users run it, or why not."""
    cfg, why = torchao_config(configs)
    if cfg is None:
        return None, why
    from torchao.quantization import quantize_

    peer = copy.deepcopy(model)
    quantize_(peer, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and bool(_IN_BLOCK.search(fqn)))
    return torch.compile(peer), None


class _LayerCache:
    """What compiled block i sees of an HF cache: ``update`` goes straight to its own layer, ignoring the index
    the block passes (HF indexes ``cache.layers`` by the module's int ``layer_idx``, which dynamo specializes:
    16 layers would be 16 graphs per shape, each traced again). Everything else is the model's cache."""

    def __init__(self, cache, layer):
        self._cache, self._layer = cache, layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self._layer.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _one_layer_view(cache, index: int):
    """The per-layer view of ``cache`` for block ``index``, or the cache itself where it cannot be had (no
    ``layers`` list yet, or an offloading cache, whose update also moves other layers)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or index >= len(layers) or getattr(cache, "offloading", False):
        return cache
    return _LayerCache(cache, layers[index])


def compile_regions(model: torch.nn.Module, backend="inductor") -> list[str]:
    """torch.compile each repeated block of an HF model in place (the classes in ``_no_split_modules``,
    e.g. LlamaDecoderLayer); returns their names. Raises when the model names no block class.

    PyTorch's regional-compilation recipe: the blocks share one compiled forward, so dynamo traces a block
    once per input shape and the others reuse its graph, where each block is handed its own layer of the KV
    cache (``_LayerCache``); a block whose modules' ``layer_idx`` is not its position keeps the cache as is
    (then each layer is a graph of its own, as it would be with ``block.compile()``)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no repeated block class (_no_split_modules={sorted(classes)}): "
                         "nothing to compile regionally")
    # Where a block cannot have its own cache view it is its own graph, and again per batch size or prompt
    # length: the default limit of 8 graphs per code object would silently leave the later layers eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    compiled = {cls: torch.compile(cls.forward, backend=backend) for cls in {type(m) for _, m in blocks}}
    for i, (_, block) in enumerate(blocks):
        own = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)} == {i}
        fn = compiled[type(block)]

        def forward(*args, _block=block, _i=i, _own=own, _fn=fn, **kwargs):
            if _own:
                for key in ("cache", "past_key_values", "past_key_value"):  # transformers 5 / 4 spellings
                    if kwargs.get(key) is not None:
                        kwargs[key] = _one_layer_view(kwargs[key], _i)
            return _fn(_block, *args, **kwargs)

        block.forward = forward
    return [n for n, _ in blocks]
