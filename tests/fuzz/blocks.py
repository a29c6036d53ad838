"""A small generator of transformer-ish blocks (heads, GQA, norms, activations, residual patterns) for fuzzing."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

HIDDEN = (24, 40, 56, 72)  # odd-ish widths: not powers of two, so every kernel masks its last block
NORMS = ("layernorm", "rmsnorm", "llama_rms")
ACTS = ("gelu", "gelu_tanh", "silu", "swiglu", "relu")
RESIDUALS = ("sequential", "parallel", "scaled")
ATTNS = ("sdpa", "manual")


@dataclass(frozen=True)
class BlockSpec:
    """Everything that decides a fuzzed model and its input; ``repr`` reproduces a failing case."""

    hidden: int = 24
    heads: int = 2
    kv_heads: int = 1
    norm: str = "layernorm"
    prenorm: bool = True
    act: str = "gelu"
    residual: str = "sequential"
    attn: str = "sdpa"
    causal: bool = False
    bias: bool = True
    ffn: int = 40
    layers: int = 1
    final_norm: bool = True
    batch: int = 1
    seq: int = 7
    seed: int = 0

    def __post_init__(self):
        assert self.hidden % self.heads == 0 and self.heads % self.kv_heads == 0, self


class LlamaRMSNorm(nn.Module):
    """The decomposed Hugging Face Llama form (fp32 upcast, pow/mean/rsqrt), not ``torch.rms_norm``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return LlamaRMSNorm(dim)


class Attention(nn.Module):
    def __init__(self, s: BlockSpec):
        super().__init__()
        self.s, self.hd = s, s.hidden // s.heads
        self.q_proj = nn.Linear(s.hidden, s.heads * self.hd, bias=s.bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * self.hd, bias=s.bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * self.hd, bias=s.bias)
        self.o_proj = nn.Linear(s.heads * self.hd, s.hidden, bias=s.bias)

    def forward(self, x):
        s, (b, n, _) = self.s, x.shape
        q = self.q_proj(x).view(b, n, s.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, n, s.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, s.kv_heads, self.hd).transpose(1, 2)
        if s.kv_heads != s.heads:  # grouped-query attention: each kv head serves heads/kv_heads queries
            k = k.repeat_interleave(s.heads // s.kv_heads, dim=1)
            v = v.repeat_interleave(s.heads // s.kv_heads, dim=1)
        if s.attn == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)
        else:  # the hand-written form: a scaled matmul, an additive mask, a last-dim softmax (fusible)
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.hd))
            if s.causal:
                scores = scores + torch.full((n, n), float("-inf"), device=x.device, dtype=scores.dtype).triu(1)
            o = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(b, n, s.heads * self.hd))


class FeedForward(nn.Module):
    def __init__(self, s: BlockSpec):
        super().__init__()
        self.act = s.act
        self.up_proj = nn.Linear(s.hidden, s.ffn, bias=s.bias)
        self.down_proj = nn.Linear(s.ffn, s.hidden, bias=s.bias)
        if s.act == "swiglu":
            self.gate_proj = nn.Linear(s.hidden, s.ffn, bias=s.bias)
        self.dropout = nn.Dropout(0.1)  # identity in eval; RemoveDropout takes it out

    def forward(self, x):
        if self.act == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.up_proj(x)
            h = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}.get(self.act, lambda t: F.gelu(t, approximate="tanh"))(h)
        return self.dropout(self.down_proj(h))


class Layer(nn.Module):
    def __init__(self, s: BlockSpec):
        super().__init__()
        self.s = s
        self.attn = Attention(s)
        self.mlp = FeedForward(s)
        self.attn_norm = make_norm(s.norm, s.hidden)
        self.mlp_norm = make_norm(s.norm, s.hidden)

    def forward(self, x):
        s = self.s
        if s.residual == "parallel":  # GPT-J / PaLM: both sublayers read the same (normed) stream
            if s.prenorm:
                h = self.attn_norm(x)
                return x + self.attn(h) + self.mlp(h)
            return self.attn_norm(x + self.attn(x) + self.mlp(x))
        scale = 0.5 if s.residual == "scaled" else 1.0  # e.g. DeepNet-style residual scaling
        if s.prenorm:
            x = x + scale * self.attn(self.attn_norm(x))
            return x + scale * self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + scale * self.attn(x))
        return self.mlp_norm(x + scale * self.mlp(x))


class Block(nn.Module):
    """``layers`` transformer layers in a ModuleList (so sublayer tagging sees blocks) + optional final norm."""

    def __init__(self, s: BlockSpec):
        super().__init__()
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))
        self.norm = make_norm(s.norm, s.hidden) if s.final_norm else nn.Identity()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def build(s: BlockSpec) -> tuple[nn.Module, torch.Tensor]:
    """The model (eval mode, norms with non-trivial weights) and its input, both from ``s.seed``."""
    torch.manual_seed(s.seed)
    model = Block(s).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # unit weights / zero biases would hide a kernel that drops them
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    x = torch.randn(s.batch, s.seq, s.hidden, generator=torch.Generator().manual_seed(s.seed + 1))
    return model, x


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def spec_dict(s: BlockSpec) -> dict:
    return asdict(s)


@st.composite
def block_specs(draw) -> BlockSpec:
    """Hypothesis strategy over BlockSpec: GQA ratios follow from the drawn head count."""
    hidden = draw(st.sampled_from(HIDDEN))
    heads = draw(st.sampled_from([d for d in divisors(hidden) if d <= 9]))
    return BlockSpec(
        hidden=hidden, heads=heads, kv_heads=draw(st.sampled_from(divisors(heads))),
        norm=draw(st.sampled_from(NORMS)), prenorm=draw(st.booleans()), act=draw(st.sampled_from(ACTS)),
        residual=draw(st.sampled_from(RESIDUALS)), attn=draw(st.sampled_from(ATTNS)), causal=draw(st.booleans()),
        bias=draw(st.booleans()), ffn=draw(st.sampled_from((hidden, 2 * hidden, 3 * hidden + 8, 100))),
        layers=draw(st.integers(1, 2)), final_norm=draw(st.booleans()), batch=draw(st.integers(1, 2)),
        seq=draw(st.sampled_from((1, 3, 5, 7, 11, 13))), seed=draw(st.integers(0, 2**16)),
    )


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def check_block(s: BlockSpec, *, atol: float, rtol: float, **compile_kw) -> list:
    """Compile ``s`` with the exact pipeline, assert it equals eager, return explain()'s kernels.

    Two oracles: ``assert_close`` to the fp32 eager output, and dynamo's ``same()`` rule against an
    fp64 run (compiled RMSE to fp64 at most 2x eager's + 1e-6), which stays meaningful when the
    kernels legitimately reassociate (Triton, GPU) instead of bit-matching ATen.
    """
    import effcompile as ec
    from effcompile.codegen.ops import env_interpret

    model, x = build(s)
    torch._dynamo.reset()  # every example is a new module of the same classes: no recompile-limit carry-over
    # Without TRITON_INTERPRET, CPU lowering would leave the row ops to torch: use_triton=False still
    # generates the kernels (reference path), which is what this checks.
    compile_kw.setdefault("use_triton", None if env_interpret() else False)
    fast = ec.effcompile(model, cache=False, **compile_kw)
    with torch.no_grad():
        out, ref = fast(x), model(x)
        ref64 = Block(s).double().eval()
        ref64.load_state_dict(model.state_dict())
        gold = ref64(x.double())
    report = ec.explain(fast)
    msg = f"{s!r}\n{report}"
    assert out.shape == ref.shape and out.dtype == ref.dtype, msg
    assert torch.isfinite(out).all(), msg
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{m}\n{msg}")
    assert rmse(out, gold) <= 2 * rmse(ref, gold) + 1e-6, msg
    assert report.kernels, f"no kernel generated\n{msg}"  # the pipeline fired: not a vacuous pass
    broken = [f for g in report.graphs for f in g.fallbacks
              if f[0] == "whole graph" or "kernel generation failed" in f[1]]
    assert not broken, f"codegen failures {broken}\n{msg}"
    assert not report.fallbacks and not report.graph_breaks, msg
    return report.kernels


SHAPE_OF = {"full": lambda lead, n: (*lead, n), "row": lambda lead, n: (n,),
            "scalar": lambda lead, n: (), "rowscalar": lambda lead, n: (*lead, 1)}


def kernel_inputs(classes, lead: tuple, n: int, seed: int) -> list[torch.Tensor]:
    """Random inputs for a generated kernel at a new shape: its ``INPUT_CLASSES`` say how each broadcasts."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE_OF[c](lead, n), generator=g) for c in classes]
