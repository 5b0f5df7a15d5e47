"""DeepSeek-V2 (deepseek-ai/DeepSeek-V2, DeepSeek-V2-Lite and V2-shaped models).

Differences from Mixtral:
- multi-head latent attention (models/mla.py) with interleaved RoPE pairs on the
  decoupled RoPE part; the cache holds the compressed latent, not K/V;
- the router takes softmax probabilities over all experts (gate in fp32), top-k either
  greedily or group-limited (`topk_method` group_limited_greedy: only the `topk_group`
  groups with the best single expert may be chosen), never renormalised, then scaled
  by `routed_scaling_factor`;
- shared experts (n_shared_experts * moe_intermediate_size wide) run on every token;
- the first `first_k_dense_replace` layers are dense MLPs, then every
  `moe_layer_freq`-th layer is MoE (DeepSeek's rule; released models use 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .base import Transformer
from .mla import MLAArgs, build_mla, make_mla_sanitizer
from .routers import GroupedRouter, check_groups

TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass
class ModelArgs(MLAArgs):
    max_position_embeddings: int = 2048
    topk_method: str = "greedy"
    scoring_func: str = "softmax"  # DeepSeek's own configs name it; V2 only has softmax
    moe_layer_freq: int = 1
    mlp_bias: bool = False

    LIMITS = {**MLAArgs.LIMITS, "moe_layer_freq": 1024}

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.topk_method not in TOPK_METHODS:
            raise ModelLoadError(f"{source}: topk_method {self.topk_method!r} is not supported by deepseek_v2 "
                                 f"(supported: {', '.join(TOPK_METHODS)})")
        if self.scoring_func != "softmax":
            raise ModelLoadError(f"{source}: scoring_func {self.scoring_func!r} is not supported by deepseek_v2 "
                                 "(only softmax)")
        if self.norm_topk_prob:  # transformers' DeepSeek-V2 never renormalises; no released model asks to
            raise ModelLoadError(f"{source}: norm_topk_prob true is not supported by deepseek_v2")
        if self.mlp_bias:
            raise ModelLoadError(f"{source}: mlp_bias true is not supported by deepseek_v2")
        if self.topk_method == "group_limited_greedy" and self.moe_layers():
            if self.n_group is None or self.topk_group is None:
                raise ModelLoadError(f"{source}: topk_method group_limited_greedy needs n_group and topk_group")
            check_groups(self.n_routed_experts, self.n_group, self.topk_group, self.top_k, source, "max")

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.first_k_dense_replace, self.num_hidden_layers) if i % self.moe_layer_freq == 0]


def router(args: ModelArgs) -> GroupedRouter:
    grouped = args.topk_method == "group_limited_greedy"
    return GroupedRouter(
        args.hidden_size, args.n_routed_experts, args.num_experts_per_tok, False, scoring="softmax",
        n_group=args.n_group if grouped else 1, topk_group=args.topk_group if grouped else 1, group_score="max",
        scaling=args.routed_scaling_factor, masked_score=0.0, float_logits=True,
    )


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    return build_mla(args, router, interleaved=True)


sanitize = make_mla_sanitizer()
