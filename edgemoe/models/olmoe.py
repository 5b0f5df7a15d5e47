"""OLMoE (allenai/OLMoE-1B-7B and OLMoE-shaped models).

Differences from Mixtral:
- RMSNorm over the whole query and key projections (`q_norm` of width heads*head_dim,
  `k_norm` of width kv_heads*head_dim), applied before the heads are split;
- optional `clip_qkv`: q, k and v are clamped to [-clip_qkv, clip_qkv] after the norms;
- `attention_bias` puts a bias on all four attention projections;
- the router keeps the raw top-k softmax probabilities unless `norm_topk_prob`;
- every layer is MoE, no shared expert, no sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, DecoderLayer, Transformer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 2048  # one routed expert
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5

    # `num_local_experts` is transformers' attribute alias of num_experts.
    ALIASES = {"num_experts": "num_local_experts"}

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def expert_dim(self) -> int:
        return self.intermediate_size

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))


def build(args: ModelArgs, layer: type[DecoderLayer] = DecoderLayer) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later.
    `layer` is the block kind (FlexOlmo: the OLMo2 post-norm block)."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm="full",
        norm_eps=args.rms_norm_eps,
        clip_qkv=args.clip_qkv,
    )
    layers = [
        layer(
            Attention(spec, rope),
            MoEBlock(i, Router(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return Transformer(args, layers)


# Every OLMoE name (full-width q_norm/k_norm, experts.N.*_proj) is a common one.
sanitize = make_sanitizer([])
