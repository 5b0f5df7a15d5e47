"""JetMoE (jetmoe/jetmoe-8b and JetMoE-shaped models).

Differences from Mixtral:
- mixture of attention heads (MoA): each layer has `num_local_experts` attention experts,
  each a query projection (H -> kv_heads * kv_channels) and an output projection back;
  a router of its own picks `num_experts_per_tok` of them per token (top-k logits, then a
  softmax over those k). The key and value projections are shared (one fused `kv_proj`),
  so the token's k query groups all attend to the same kv_heads heads: query head h uses
  kv head h % kv_heads (transformers repeats, not interleaves, the KV heads). Each
  group's output goes through its expert's output projection, weighted by the gate, and
  the sum gets a bias. The attention experts are small and chosen per token, so they
  stay resident; only the MLP experts go through the expert provider;
- the MoE MLP adds a bias after its weighted expert sum; its experts are stored fused:
  `input_linear` (E, 2I, H) holds gate then up rows, `output_linear` (E, H, I) the down;
- the per-layer RMSNorms use eps 1e-6 whatever rms_norm_eps says (transformers builds them
  without it); rms_norm_eps applies to the final norm only;
- config names: kv_channels (head_dim), activation_function (hidden_act); the number of
  query heads is kv_heads * num_experts_per_tok; embeddings tied by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, DecoderLayer, Transformer, make_sanitizer
from .granitemoe import split_experts
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router

LAYER_EPS = 1e-6  # transformers' JetMoeRMSNorm default, used by every decoder layer's norms


@dataclass
class ModelArgs(BaseModelArgs):
    num_attention_heads: int | None = None  # derived: num_key_value_heads * num_experts_per_tok
    num_key_value_heads: int = 16
    head_dim: int = 128
    intermediate_size: int = 5632  # one routed MLP expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = True

    ALIASES = {"head_dim": "kv_channels", "hidden_act": "activation_function"}

    def validate(self, source: str) -> None:
        if self.num_experts_per_tok > self.num_local_experts:
            raise ModelLoadError(f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) must be at most "
                                 f"num_local_experts ({self.num_local_experts})")
        heads = self.num_key_value_heads * self.num_experts_per_tok
        if self.num_attention_heads is not None and self.num_attention_heads != heads:
            raise ModelLoadError(f"{source}: num_attention_heads ({self.num_attention_heads}) must be "
                                 f"num_key_value_heads x num_experts_per_tok ({heads}): JetMoE's query heads are "
                                 "its routed query groups")
        self.num_attention_heads = heads
        super().validate(source)

    @property
    def experts_per_layer(self) -> int:
        return self.num_local_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def expert_dim(self) -> int:
        return self.intermediate_size

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))


class MoAAttention(Attention):
    """Mixture of attention heads: `q` and `o` (methods here, not linear layers) are routed
    per token among E experts, `q` computing the gate that `o` then uses; the rest (shared
    K/V, RoPE, caches, masks, batched rows) is Attention.forward itself.

    Query heads are laid out kv-major, head = j * k + slot for KV head j, so that SDPA's
    grouped heads (head // k = j) pair each slot's j-th query head with KV head j, as
    transformers' repeated KV heads do."""

    def __init__(self, spec: AttentionSpec, rope: RoPE, num_experts: int, top_k: int):
        super().__init__(spec, rope)
        D = spec.kv_heads * spec.head_dim  # one expert's query width
        del self.q, self.o
        self.q_experts = nn.Parameter(torch.empty(num_experts, D, spec.hidden))  # (E, kv*D, H)
        self.o_experts = nn.Parameter(torch.empty(num_experts, spec.hidden, D))  # (E, H, kv*D)
        self.o_bias = nn.Parameter(torch.zeros(spec.hidden))
        self.router = nn.Parameter(torch.empty(num_experts, spec.hidden))  # (E, H)
        self.top_k = top_k
        self._route: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> gate weights (N, k), expert ids (N, k), logits (N, E): the top k
        logits, then a softmax over those k (in fp32, as transformers)."""
        logits = F.linear(x, self.router).float()  # (N, E)
        top, ids = logits.topk(self.top_k, dim=-1)  # (N, k) x2
        return torch.softmax(top, dim=-1).to(x.dtype), ids, logits

    def q(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's k expert queries, kv-major: (B, T, kv*k*D). Routes the tokens; `o`,
        called later in the same forward, uses that routing."""
        B, T, H = x.shape
        xf = x.reshape(-1, H)  # (N, H)
        weights, ids, _ = self.route(xf)  # (N, k) x2
        self._route = weights, ids
        out = x.new_empty(xf.shape[0], self.top_k, self.q_experts.shape[1])  # (N, k, kv*D)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out[tok, slot] = F.linear(xf[tok], self.q_experts[e])  # (n, kv*D)
        s = self.spec
        out = out.view(B, T, self.top_k, s.kv_heads, s.head_dim).transpose(2, 3)  # (B, T, kv, k, D)
        return out.reshape(B, T, -1)

    def o(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, T, kv*k*D), kv-major -> gate-weighted sum of each slot's
        expert output projection, plus the bias: (B, T, H)."""
        B, T, _ = out.shape
        s = self.spec
        weights, ids = self._route
        self._route = None
        per = out.view(B, T, s.kv_heads, self.top_k, s.head_dim).transpose(2, 3)  # (B, T, k, kv, D)
        per = per.reshape(B * T, self.top_k, -1)  # (N, k, kv*D)
        y = out.new_zeros(B * T, s.hidden)  # (N, H)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y.index_add_(0, tok, F.linear(per[tok, slot], self.o_experts[e]) * weights[tok, slot, None])
        return (y + self.o_bias).view(B, T, s.hidden)


class BiasedMoEBlock(MoEBlock):
    """MoE block with a bias added after the weighted expert sum (JetMoE's MLP)."""

    def __init__(self, layer: int, router: Router, hidden: int):
        super().__init__(layer, router)
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias  # (B, T, H)


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed MLP experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(hidden=args.hidden_size, heads=args.num_attention_heads, kv_heads=args.num_key_value_heads,
                         head_dim=args.head_dim)
    E, k = args.num_local_experts, args.num_experts_per_tok
    layers = []
    for i in range(args.num_hidden_layers):
        # Top-k logits then softmax over them = softmax, top k, renormalise.
        mlp = BiasedMoEBlock(i, Router(args.hidden_size, E, k, norm_topk=True), args.hidden_size)
        layers.append(DecoderLayer(MoAAttention(spec, rope, E, k), mlp, args.hidden_size, LAYER_EPS))
    return Transformer(args, layers)


_rename = make_sanitizer([
    (r"model\.layers\.(\d+)\.self_attention\.experts\.input_linear\.weight", r"layers.\1.attn.q_experts"),
    (r"model\.layers\.(\d+)\.self_attention\.experts\.output_linear\.weight", r"layers.\1.attn.o_experts"),
    (r"model\.layers\.(\d+)\.self_attention\.experts\.bias", r"layers.\1.attn.o_bias"),
    (r"model\.layers\.(\d+)\.self_attention\.experts\.router\.layer\.weight", r"layers.\1.attn.router"),
    (r"model\.layers\.(\d+)\.mlp\.bias", r"layers.\1.mlp.bias"),
    (r"model\.layers\.(\d+)\.mlp\.router\.layer\.weight", r"layers.\1.mlp.router.weight"),
])

_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.(input|output)_linear\.weight$")
_KV = re.compile(r"model\.layers\.(\d+)\.self_attention\.kv_proj\.weight$")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours: the MLP experts split per expert, the fused kv_proj
    (rows [k | v]) into k and v."""
    fused = _FUSED.match(name)
    if fused:
        return split_experts(int(fused.group(1)), fused.group(2), name, tensor)
    kv = _KV.match(name)
    if kv:
        if tensor.dim() != 2 or tensor.shape[0] % 2:
            raise ModelLoadError(f"{name!r} should be 2-D with an even number of rows, got {tuple(tensor.shape)}")
        k, v = tensor.chunk(2, dim=0)  # (kv*D, H) x2
        return [(f"layers.{kv.group(1)}.attn.k.weight", k), (f"layers.{kv.group(1)}.attn.v.weight", v)]
    return _rename(name, tensor)
