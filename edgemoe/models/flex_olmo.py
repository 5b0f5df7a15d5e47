"""FlexOlmo (allenai/FlexOlmo-7x7B-1T and FlexOlmo-shaped models).

OLMoE's MoE layers in an OLMo2 block:
- post-norm: the input of attention and of the MoE block is not normalised; their
  outputs are (`post_attention_layernorm`, `post_feedforward_layernorm`) before each
  residual add;
- RMSNorm over the whole query and key projections (`q_norm` of width heads*head_dim,
  `k_norm` of width kv_heads*head_dim) before the heads are split; no clip_qkv;
- `attention_bias` puts a bias on all four attention projections;
- the router keeps the raw top-k softmax probabilities unless `norm_topk_prob`;
- every layer is MoE; no shared expert, no sliding window; rope theta defaults to 5e5.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, PostNormDecoderLayer, Transformer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router

DEFAULT_THETA = 500000.0  # FlexOlmoConfig.default_theta, used when the config names none


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 11008  # one routed expert
    num_experts: int = 7
    num_experts_per_tok: int = 5
    norm_topk_prob: bool = False
    attention_bias: bool = False

    # `num_local_experts` is transformers' attribute alias of num_experts.
    ALIASES = {"num_experts": "num_local_experts"}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        params = config.get("rope_parameters")
        if "rope_theta" not in config and not (isinstance(params, dict) and "rope_theta" in params):
            config = {**config, "rope_theta": DEFAULT_THETA}
        return super().from_dict(config, source)

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


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
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
    )
    layers = [
        PostNormDecoderLayer(
            Attention(spec, rope),
            MoEBlock(i, Router(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return Transformer(args, layers)


# The two post-norms: norm1 follows attention, norm2 the MoE block (PostNormDecoderLayer).
# Every other name (full-width q/k norms, mlp.gate, mlp.experts.N.*_proj) is a common one.
sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.norm1.weight"),
        (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", r"layers.\1.norm2.weight"),
    ]
)
