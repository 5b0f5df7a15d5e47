"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B and Qwen3-MoE-shaped models).

Differences from Mixtral:
- RMSNorm on every query and key head (`q_norm`, `k_norm` over head_dim) before RoPE;
- an explicit `head_dim` that need not equal hidden_size / num_attention_heads;
- `attention_bias` puts a bias on all four attention projections (o included);
- the router keeps the raw top-k softmax probabilities unless `norm_topk_prob`;
- dense MLP layers (width `intermediate_size`) by `mlp_only_layers` / `decoder_sparse_step`;
- no shared expert; a sliding window on every layer only when `use_sliding_window`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, is_moe_layer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 6144  # dense (non-MoE) layers
    moe_intermediate_size: int = 768  # one routed expert
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096

    # 0 experts makes every layer dense; a window is unused without use_sliding_window.
    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_experts", "num_experts_per_tok", "mlp_only_layers", "sliding_window"}
    # transformers 5 writes the expert count as `num_local_experts` (an attribute alias
    # of num_experts); hub checkpoints use `num_experts`.
    ALIASES = {"num_experts": "num_local_experts"}

    def __post_init__(self):
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if not self.use_sliding_window:
            self.sliding_window = None

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.sliding_window == 0:  # kept only with use_sliding_window (__post_init__)
            raise ModelLoadError(f"{source}: sliding_window must be positive when use_sliding_window is true, got 0")

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def expert_dim(self) -> int:
        return self.moe_intermediate_size

    def moe_layers(self) -> list[int]:
        return [
            i
            for i in range(self.num_hidden_layers)
            if is_moe_layer(i, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers)
        ]


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
        qk_norm="head",
        norm_eps=args.rms_norm_eps,
        sliding_window=args.sliding_window,
    )
    moe = set(args.moe_layers())
    layers = []
    for i in range(args.num_hidden_layers):
        if i in moe:
            mlp = MoEBlock(i, Router(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob))
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(Attention(spec, rope), mlp, args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


# Every Qwen3-MoE name (q_norm/k_norm, experts.N.*_proj, dense mlp.*_proj) is a common one.
sanitize = make_sanitizer([])
