"""DeepSeek-V3 (deepseek-ai/DeepSeek-V3, R1, Moonlight and V3-shaped models).

Differences from DeepSeek-V2:
- the router scores experts with a sigmoid (gate in fp32) and chooses on the scores plus
  `e_score_correction_bias` (a load-balancing bias that never enters the weights); the
  n_group groups are ranked by the sum of their best two corrected scores, and experts
  outside the `topk_group` best groups can never be chosen (-inf, even over a negative
  corrected score); the chosen experts' plain scores are renormalised with
  `norm_topk_prob` (sum + 1e-20) and then scaled by `routed_scaling_factor`;
- RoPE pairs are interleaved only with `rope_interleave` (else the half layout);
- the multi-token-prediction layer that follows the decoder (model.layers.61 in V3 and
  R1, as transformers skips it) is not loaded: it only drafts tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .base import Transformer
from .mla import MLAArgs, build_mla, make_mla_sanitizer
from .routers import GroupedRouter, check_groups


@dataclass
class ModelArgs(MLAArgs):
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int | None = 8
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    rope_interleave: bool = True
    topk_method: str | None = None  # DeepSeek's own configs: "noaux_tc", the only kind here
    scoring_func: str | None = None  # likewise "sigmoid"
    moe_layer_freq: int = 1

    LIMITS = {**MLAArgs.LIMITS, "moe_layer_freq": 1024}

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.topk_method not in (None, "noaux_tc"):
            raise ModelLoadError(f"{source}: topk_method {self.topk_method!r} is not supported by {self.model_type} "
                                 "(only noaux_tc)")
        if self.scoring_func not in (None, "sigmoid"):
            raise ModelLoadError(f"{source}: scoring_func {self.scoring_func!r} is not supported by "
                                 f"{self.model_type} (only sigmoid)")
        if self.moe_layers():
            check_groups(self.n_routed_experts, self.n_group, self.topk_group, self.top_k, source)

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.first_k_dense_replace, self.num_hidden_layers) if i % self.moe_layer_freq == 0]


def router(args: ModelArgs) -> GroupedRouter:
    """The V3 router ("noaux_tc"), shared with GLM-4.7-Flash."""
    return GroupedRouter(
        args.hidden_size, args.n_routed_experts, args.num_experts_per_tok, args.norm_topk_prob, scoring="sigmoid",
        correction=True, n_group=args.n_group, topk_group=args.topk_group, group_score="top2",
        scaling=args.routed_scaling_factor, norm_eps=1e-20, masked_score=float("-inf"), float_logits=True,
    )


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    return build_mla(args, router, interleaved=args.rope_interleave)


sanitize = make_mla_sanitizer(skip_mtp=True)
