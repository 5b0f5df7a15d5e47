"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B and Qwen2-MoE-shaped models).

Differences from Mixtral:
- a shared expert runs on every token next to the routed ones; its output is scaled by
  sigmoid(shared_expert_gate(x)) before it is added;
- the router keeps the raw top-k softmax probabilities unless `norm_topk_prob`;
- q/k/v projections carry a bias (`qkv_bias`), the output projection does not;
- some layers may be dense MLPs (of width `intermediate_size`): those in `mlp_only_layers`
  and, otherwise, those whose (index + 1) is not a multiple of `decoder_sparse_step`;
- sliding-window attention applies per layer, by `layer_types`; old configs without
  `layer_types` get transformers' rule (even layers below `max_window_layers`, and only
  with `use_sliding_window`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cpu import Linear
from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, is_moe_layer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 5632  # dense (non-MoE) layers
    moe_intermediate_size: int = 1408  # one routed expert
    shared_expert_intermediate_size: int = 5632
    num_experts: int = 60
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    # 0 experts makes every layer dense; transformers writes sliding_window 0 when
    # use_sliding_window is false (checked in validate).
    ZERO_OK = BaseModelArgs.ZERO_OK | {
        "num_experts", "num_experts_per_tok", "shared_expert_intermediate_size", "mlp_only_layers",
        "max_window_layers", "sliding_window",
    }

    def __post_init__(self):
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.layer_types is None:
            # transformers' rule (Qwen2MoeConfig.__post_init__) for configs without layer_types.
            self.layer_types = [
                "sliding_attention"
                if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.use_sliding_window and self.sliding_window == 0:
            raise ModelLoadError(f"{source}: sliding_window must be positive when use_sliding_window is true, got 0")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"{source}: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(unknown)}")

    def window(self, layer: int) -> int | None:
        """Sliding window of one layer, or None for full attention. transformers zeroes
        the window unless `use_sliding_window`, so the flag gates it."""
        if self.use_sliding_window and self.sliding_window and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

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
    moe = set(args.moe_layers())
    layers = []
    for i in range(args.num_hidden_layers):
        spec = AttentionSpec(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.qkv_bias,
            sliding_window=args.window(i),
        )
        if i in moe:
            shared = args.shared_expert_intermediate_size
            mlp = MoEBlock(
                i,
                Router(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob),
                shared=MLP(args.hidden_size, shared, args.hidden_act) if shared else None,
                # present in every checkpoint, even without a shared expert
                shared_gate=Linear(args.hidden_size, 1, bias=False),
            )
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(Attention(spec, rope), mlp, args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


_sanitize = make_sanitizer([])


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours (all Qwen2-MoE names are common ones). A config with
    shared_expert_intermediate_size 0 stores zero-element shared-expert matrices; they
    hold no weights and are dropped."""
    if ".shared_expert." in name and tensor.numel() == 0:
        return []
    return _sanitize(name, tensor)
