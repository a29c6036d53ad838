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


def compile_regions(model: torch.nn.Module, backend: str = "inductor") -> list[str]:
    """torch.compile each repeated block of an HF model in place (the classes in ``_no_split_modules``,
    e.g. LlamaDecoderLayer); returns their names. Raises when the model names no block class."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no repeated block class (_no_split_modules={sorted(classes)}): "
                         "nothing to compile regionally")
    # Each layer is its own graph (HF's cache indexes its layers by the module's int layer_idx, which dynamo
    # treats as static), and again per batch size or prompt length: the default limit of 8 graphs per code
    # object would silently leave the later layers eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for _, m in blocks:
        m.compile(backend=backend)
    return [n for n, _ in blocks]
