"""Weight-only quantization: replace targeted linears with the effcompile::wq_linear IR op."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from effcompile.compiler import ir
from effcompile.compiler import ops as qops
from effcompile.compiler.pass_manager import PassConfig, PassContext, PassResult, register_pass
from effcompile.passes.eora import compensate
from effcompile.passes.smoothing import smooth
from effcompile.runtime.key import contents_version

PARTS = ("embedding", "attn", "ffn", "head", "other")
_TAG = re.compile(r"^layers\.\d+\.(attn|ffn)$")
# weights= value -> (IR format, allowed group sizes; None = per output channel, or the MX block of 32)
WEIGHTS = {"int8": ("int8", (None,)), "int4": ("int4", (32, 64, 128)), "fp8": ("fp8", (None,)),
           "mxint8": ("mxint8", (None, 32)), "mxfp8": ("mxfp8", (None, 32))}


@dataclass(frozen=True)
class Quantize(PassConfig):
    """Weight-only quantization of linear layers.

    weights="int8": per-channel symmetric int8 (group_size must be None).
    weights="int4": group-wise asymmetric int4 (group_size 32, 64 or 128), two values per byte.
    weights="fp8": e4m3 with one scale per output channel (group_size None).
    weights="mxint8" / "mxfp8": MX-style blocks of 32 along K (int8 / e4m3 elements) sharing a
      power-of-two scale; no calibration (group_size None or 32).
    activations: "none" (weight-only), "int8" (dynamic per-token symmetric: W8A8, with int8/mxint8
      weights) or "fp8" (dynamic per-token e4m3, with fp8/mxfp8 weights).
    smooth: SmoothQuant's alpha (passes/smoothing.py); None = no smoothing. Needs calibration data.
    eora_rank: rank r of the EoRA side path B(Ax) fitted to the quantization error in the activation
      eigenspace (passes/eora.py); 0 = none. Needs calibration data.
    targets: sublayer parts ("embedding", "attn", "ffn", "head", "other") or exact tags
    ("layers.3.attn") whose linears are quantized; the default leaves the head in high precision.
    """

    weights: str = "int8"
    group_size: int | None = None
    targets: tuple[str, ...] = ("attn", "ffn")
    activations: str = "none"
    smooth: float | None = None  # SmoothQuant alpha in [0, 1]: calibrated, needs calibration= data
    eora_rank: int = 0  # EoRA low-rank error compensation rank (0 = off): calibrated
    lossy: ClassVar[bool] = True
    reads_weights: ClassVar[bool] = True  # the backend puts a hash of the weights in the cache key

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"Quantize.weights={self.weights!r} is not supported; supported: {sorted(WEIGHTS)}")
        groups = WEIGHTS[self.weights][1]
        if self.group_size not in groups:
            raise ValueError(f"Quantize.group_size={self.group_size!r} is not supported for weights="
                             f"{self.weights!r}; supported: {list(groups)}")
        if self.activations not in qops.ACTIVATIONS or self.fmt not in qops.ACTIVATIONS[self.activations]:
            ok = [a for a, w in qops.ACTIVATIONS.items() if self.fmt in w]
            raise ValueError(f"Quantize.activations={self.activations!r} is not supported with weights="
                             f"{self.weights!r}; supported: {ok}")
        if self.smooth is not None and (isinstance(self.smooth, bool) or not isinstance(self.smooth, int | float)
                                        or not 0 <= self.smooth <= 1):
            raise ValueError(f"Quantize.smooth={self.smooth!r}: SmoothQuant's alpha must be None or in [0, 1]")
        if isinstance(self.eora_rank, bool) or not isinstance(self.eora_rank, int) or self.eora_rank < 0:
            raise ValueError(f"Quantize.eora_rank={self.eora_rank!r}: must be an int >= 0 (0 = no compensation)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if not isinstance(t, str) or not (t in PARTS or _TAG.match(t))]
        if bad or not targets:
            raise ValueError(f"Quantize.targets={self.targets!r}: each must be one of {list(PARTS)} or a tag "
                             f"like 'layers.3.attn'; got {bad or 'nothing'}")
        object.__setattr__(self, "targets", targets)  # a tuple, so the config stays hashable

    @property
    def fmt(self) -> str:
        return WEIGHTS[self.weights][0]

    @property
    def needs_calibration(self) -> bool:  # read per instance by the compiler: smoothing and EoRA calibrate
        return self.smooth is not None or self.eora_rank > 0

    @property
    def group(self) -> int:
        """The IR op's group size: 0 = per output channel; the MX block is always 32."""
        return self.group_size or qops.FORMATS[self.fmt][0]


def _selected(tag: ir.Sublayer | None, targets: tuple[str, ...]) -> bool:
    return tag is not None and (tag.part in targets or str(tag) in targets)


def _linear_args(node: fx.Node):
    """(x, weight, bias) of a linear call, positional or keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = args[0] if args[0] is not None else node.kwargs.get("input")
    w = args[1] if args[1] is not None else node.kwargs.get("weight")
    b = args[2] if args[2] is not None else node.kwargs.get("bias")
    return x, w, b


def _why_not(w: torch.Tensor | None, cfg: Quantize) -> str | None:
    if not isinstance(w, torch.Tensor):
        return "weight is not a parameter of the model"
    if w.dtype not in qops.FLOAT_DTYPES:
        return f"weight dtype {w.dtype} is not a float type"
    if w.dim() != 2:
        return f"weight has shape {tuple(w.shape)}, not 2-D"
    if cfg.group and w.shape[1] % cfg.group:
        return f"in_features={w.shape[1]} is not divisible by group_size={cfg.group}"
    return None


def _quantized(w: torch.Tensor, fmt: str, group: int) -> tuple[qops.QuantizedWeight, float]:
    """``w`` quantized, and its weight SQNR."""
    # Looked up on the module at call time, so a test can prove a warm start never gets here.
    qw = qops.quantize_weight(w.detach(), fmt, group)
    return qw, round(qops.weight_sqnr(w, qw), 2)


def _packed(real: torch.Tensor, fmt: str, group: int, shared: dict) -> tuple[qops.QuantizedWeight, float]:
    """``_quantized(real)``, shared by the compiled model's graphs (its prefill and each decode batch size:
    ctx.shared) instead of quantizing every weight again for each (llama-1b int4 on the CPU box: 54 s a graph
    before the row blocks of ops._quantize); a parameter changed in place since (its _version) is quantized again.
    An entry holds its parameter, so the id in its key is not reused while it is cached."""
    memo = shared.setdefault("quantize.packed", {})
    key = (id(real), fmt, group, contents_version(real), real.dtype, real.device)
    if key not in memo:
        memo[key] = (real, *_quantized(real, fmt, group))
    return memo[key][1], memo[key][2]


@register_pass(Quantize, phase="quantize", invalidates=())
def quantize(gm: fx.GraphModule, cfg: Quantize, ctx: PassContext) -> PassResult:
    """Quantize each targeted linear whose weight is a model parameter; keep the rest dense and say why."""
    mode = ir.fake_mode_for(gm, ctx.example_inputs)
    group = cfg.group
    layers: dict[str, dict] = {}
    dense: dict[str, str] = {}
    where: list[str] = []
    sites = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or ir.target_name(node) != "linear":
            continue
        tag = ir.sublayer(node)
        if not _selected(tag, cfg.targets):
            continue
        x, w_node, b_node = _linear_args(node)
        real = ctx.params.get(w_node.name) if isinstance(w_node, fx.Node) and w_node.op == "placeholder" else None
        reason = _why_not(real, cfg)
        if reason is not None:
            dense[tag.module or node.name] = reason
            continue
        sites.append((node, x, real))
    smoothed, smoothing, compensated = {}, None, []
    if cfg.smooth is not None and sites:
        smoothed, smoothing = smooth(gm, ctx, sites, cfg.smooth, mode, key=cfg)
    for node, _, real in sites:
        tag = ir.sublayer(node)
        label = tag.module or node.name
        x, w_node, b_node = _linear_args(node)
        w = smoothed.get(node, real.detach())
        # A smoothed weight is this graph's own copy; a parameter's codes are shared with the model's other graphs.
        qw, sqnr = _quantized(w, cfg.fmt, group) if node in smoothed else _packed(real, cfg.fmt, group, ctx.shared)
        base = f"_ec_q_{node.name}"
        qnode = ir.add_buffer(gm, node, f"{base}_qweight", qw.qweight, tag, mode)
        snode = ir.add_buffer(gm, node, f"{base}_scales", qw.scales, tag, mode)
        znode = ir.add_buffer(gm, node, f"{base}_zeros", qw.zeros, tag, mode)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(qops.wq_linear_op(),
                                         (x, qnode, snode, znode, b_node, cfg.fmt, group, cfg.activations))
        new.meta.update({k: v for k, v in node.meta.items() if k in (ir.VAL, ir.TAG, "nn_module_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if cfg.eora_rank:
            # The error W - W_q as a function: EoRA computes it when it fits this linear, and drops it after.
            compensated.append((new, x, lambda w=w, qw=qw: w.float() - qops.dequantize(*qw[:3], cfg.fmt, group),
                                real))
        layers[label] = {
            "shape": list(w.shape),
            "bytes_dense": w.numel() * w.element_size(),
            "bytes_quantized": qw.nbytes(),
            "weight_sqnr_db": sqnr,
        }
        where.append(str(tag))
    artifacts = {"format": cfg.fmt, "group_size": cfg.group_size, "activations": cfg.activations,
                 "layers": layers, "dense": dense}
    if smoothing is not None:
        artifacts["smoothing"] = smoothing
    if compensated:
        artifacts["eora"] = compensate(gm, ctx, compensated, cfg.eora_rank, mode, key=cfg)
    if layers:
        artifacts["bytes_dense"] = sum(v["bytes_dense"] for v in layers.values())
        artifacts["bytes_quantized"] = sum(v["bytes_quantized"] for v in layers.values())
    note = "; ".join(f"{k} kept dense: {v}" for k, v in dense.items())
    reused = [what for what, art in (("smoothing scales", smoothing), ("EoRA factors", artifacts.get("eora")))
              if art and art.get("reused")]
    if reused:
        note = "; ".join([note] * bool(note) + [
            "no calibration data reached this graph (e.g. a decode step after prefill-shaped calibration): "
            f"{' and '.join(reused)} reused from the graph of this model calibrated earlier in this process"])
    if not layers:
        note = note or f"no linear with a parameter weight in targets {list(cfg.targets)}"
    return PassResult(modified=bool(layers), count=len(layers), where=where, artifacts=artifacts, note=note)
