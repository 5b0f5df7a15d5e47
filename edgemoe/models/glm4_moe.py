"""GLM-4.5 and GLM-4.5-Air (zai-org; model_type glm4_moe). dots1 reuses its blocks.

Differences from Qwen3-MoE:
- DeepSeek-V3 routing: sigmoid scores; a learned per-expert `e_score_correction_bias`
  added only to choose the experts; the experts form `n_group` groups of which the
  `topk_group` with the best sum of their top two scores may be chosen (the others are
  never chosen); the chosen scores are renormalised (`norm_topk_prob`) and multiplied by
  `routed_scaling_factor`. The gate runs in fp32, as transformers keeps it;
- `n_shared_experts` always-on shared experts: one ungated MLP of width
  n_shared_experts * moe_intermediate_size next to the routed ones;
- the first `first_k_dense_replace` layers are dense MLPs of width `intermediate_size`;
- partial RoPE: only the first head_dim * `partial_rotary_factor` channels of each head
  rotate (0.5 when the config does not say);
- optional per-head q/k RMSNorm (`use_qk_norm`); `attention_bias` on q/k/v, never on o.
The multi-token-prediction layers (`num_nextn_predict_layers`) are not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, make_sanitizer, past_last_layer
from .moe import MoEBlock
from .rope import RoPE
from .routers import GroupedRouter, check_groups


def lift_rope_key(config: dict, key: str) -> dict:
    """`config` with `key` taken from its rope block when set there: transformers puts
    partial_rotary_factor in rope_parameters, and a value there wins over a top-level one."""
    for block in ("rope_parameters", "rope_scaling"):
        params = config.get(block)
        if isinstance(params, dict) and key in params:
            return {**config, key: params[key]}
    return config


def check_rope_dim(head_dim: int, factor: float, dim: int, source: str) -> None:
    """Partial rotary must rotate an even number (pairs) of a head's channels."""
    if not 0 < factor <= 1:
        raise ModelLoadError(f"{source}: partial_rotary_factor must be in (0, 1], got {factor!r}")
    if dim < 2 or dim % 2:
        raise ModelLoadError(f"{source}: partial_rotary_factor {factor!r} of head_dim {head_dim} rotates {dim} "
                             "channels; RoPE needs a positive even number")


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 10944  # dense layers
    moe_intermediate_size: int = 1408  # one routed (and one shared) expert
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"  # written by some V3-router configs; transformers always uses sigmoid
    attention_bias: bool = False
    use_qk_norm: bool = False
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072

    # 0 shared experts: transformers builds an empty shared MLP (it adds nothing).
    ZERO_OK = BaseModelArgs.ZERO_OK | {"n_shared_experts", "first_k_dense_replace"}
    LIMITS = {**BaseModelArgs.LIMITS, "n_routed_experts": 4096, "n_shared_experts": 4096, "n_group": 4096,
              "topk_group": 4096, "first_k_dense_replace": 1024}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        return super().from_dict(lift_rope_key(config, "partial_rotary_factor"), source)

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.scoring_func != "sigmoid":
            raise ModelLoadError(f"{source}: scoring_func {self.scoring_func!r} is not supported ({self.model_type} "
                                 "routes with sigmoid scores)")
        check_rope_dim(self.head_dim, self.partial_rotary_factor, self.rope_dim, source)
        if self.moe_layers():
            check_groups(self.n_routed_experts, self.n_group, self.topk_group, self.top_k, source)

    @property
    def rope_dim(self) -> int:
        """Leading channels of each head that RoPE rotates (transformers truncates)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def experts_per_layer(self) -> int:
        return self.n_routed_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def expert_dim(self) -> int:
        return self.moe_intermediate_size

    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))


def v3_router(args: ModelArgs) -> GroupedRouter:
    """The DeepSeek-V3 router as GLM-4.5 and dots1 run it."""
    return GroupedRouter(
        args.hidden_size, args.n_routed_experts, args.num_experts_per_tok, args.norm_topk_prob,
        scoring="sigmoid", correction=True, n_group=args.n_group, topk_group=args.topk_group, group_score="top2",
        scaling=args.routed_scaling_factor, masked_score=float("-inf"), float_logits=True,
    )


def build_decoder(args: ModelArgs, spec: Callable[[int], AttentionSpec], rope: RoPE) -> Transformer:
    """Dense layers, then MoE layers with V3 routing and ungated shared experts;
    `spec(layer)` gives each layer's attention."""
    moe = set(args.moe_layers())
    shared = args.n_shared_experts * args.moe_intermediate_size
    layers = []
    for i in range(args.num_hidden_layers):
        if i in moe:
            expert = MLP(args.hidden_size, shared, args.hidden_act) if shared else None
            mlp = MoEBlock(i, v3_router(args), shared=expert)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(Attention(spec(i), rope), mlp, args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        qk_norm="head" if args.use_qk_norm else None,
        norm_eps=args.rms_norm_eps,
    )
    return build_decoder(args, lambda i: spec, RoPE(args.rope_dim, args.rope_theta, args.rope_scaling))


# GLM-4.5 and dots1 names on disk; dense layers, experts and attention are common names.
RULES = [
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"layers.\1.mlp.router.e_score_correction_bias"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
]
_sanitize = make_sanitizer(RULES)


def sanitize(name: str, tensor: torch.Tensor, args=None) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours. With n_shared_experts 0 transformers saves empty
    shared-expert matrices; they hold nothing and are dropped, and so are the
    multi-token-prediction layers GLM-4.5 stores after the decoder (model.layers.46 in
    Air, .92 in GLM-4.5: past num_hidden_layers)."""
    if ".shared_experts." in name and tensor.numel() == 0:
        return []
    if args is not None and past_last_layer(name, args):
        return []
    return _sanitize(name, tensor)
