"""effcompile: a JIT compiler and pass framework for efficient transformer inference.

    fast = effcompile.effcompile(model)              # or @effcompile.effcompile(passes=[...])
    fast = torch.compile(model, backend="effcompile")
    print(effcompile.explain(fast))
"""

from effcompile.compiler.api import effcompile, explain
from effcompile.compiler.pass_manager import PassConfig, PassResult
from effcompile.compiler.speculative import generate
from effcompile.passes import (
    EarlyExit,
    MergeTokens,
    PruneTokens,
    Quantize,
    RemoveDropout,
    SkipLayers,
    ThresholdChannels,
    register_pass,
    rewrite,
)

__version__ = "0.1.0"

__all__ = [
    "EarlyExit",
    "MergeTokens",
    "PassConfig",
    "PassResult",
    "PruneTokens",
    "Quantize",
    "RemoveDropout",
    "SkipLayers",
    "ThresholdChannels",
    "__version__",
    "effcompile",
    "explain",
    "generate",
    "register_pass",
    "rewrite",
]
