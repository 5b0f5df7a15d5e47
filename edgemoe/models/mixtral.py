"""Mixtral (mistralai/Mixtral-8x7B, 8x22B and Mixtral-shaped models).

Every layer is MoE. The router takes a softmax over all experts, keeps the top k and
renormalises them (the same as top-k then softmax). No shared expert, no q/k norms;
an optional sliding window applies to every layer.
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
    intermediate_size: int = 14336
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5

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


def build(args: ModelArgs) -> Transformer:
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        sliding_window=args.sliding_window,
    )
    layers = [
        DecoderLayer(
            Attention(spec, rope),
            MoEBlock(i, Router(args.hidden_size, args.num_local_experts, args.num_experts_per_tok, norm_topk=True)),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return Transformer(args, layers)


# Mixtral's own names on disk (w1 = gate, w3 = up, w2 = down); the rest are common.
sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.mlp.router.weight"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"experts.\1.\2.gate"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"experts.\1.\2.up"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"experts.\1.\2.down"),
    ]
)
