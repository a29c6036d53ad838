"""Peer variants measured in the same run as effcompile: TorchAO's weight-only quantization for Quantize specs."""

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
