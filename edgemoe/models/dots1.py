"""dots.llm1 (rednote-hilab/dots.llm1.base and .inst; model_type dots1).

GLM-4.5's model (glm4_moe.py: DeepSeek-V3 routing with fp32 gate, ungated shared
experts, `first_k_dense_replace` dense layers) with these differences:
- per-head q/k RMSNorm on every layer; `attention_bias` on all four projections;
- per-layer sliding windows by `layer_types`; configs without it get transformers' rule
  (layers from `max_window_layers` on slide, when `sliding_window` is set);
- RoPE rotates the whole head: transformers' default RoPE for dots1 ignores
  `partial_rotary_factor` (the scaled kinds honour it, as for every family);
- the routed-expert shape has no defaults, and released configs write n_group and
  topk_group as null (one group).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from . import glm4_moe
from .attention import AttentionSpec
from .base import Transformer
from .rope import RoPE

KINDS = ("full_attention", "sliding_attention")


@dataclass
class ModelArgs(glm4_moe.ModelArgs):
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    n_group: int | None = 1
    topk_group: int | None = 1
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = 4096
    max_window_layers: int = 62
    layer_types: list[str] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048

    ZERO_OK = glm4_moe.ModelArgs.ZERO_OK | {"max_window_layers"}

    def __post_init__(self):
        self.n_group = self.n_group or 1
        self.topk_group = self.topk_group or 1
        if self.layer_types is None:
            # transformers' rule (Dots1Config.__post_init__) for configs without layer_types.
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]

    def validate(self, source: str) -> None:
        for name in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok"):
            if getattr(self, name) is None:
                raise ModelLoadError(f"{source}: {name} is required (dots1 has no default for it)")
        super().validate(source)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"{source}: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - set(KINDS))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(unknown)}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ModelLoadError(f"{source}: layer_types has sliding_attention layers but sliding_window is null")

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rope_scaling is None else super().rope_dim

    def window(self, layer: int) -> int | None:
        """Sliding window of one layer, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""

    def spec(i: int) -> AttentionSpec:
        return AttentionSpec(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=args.window(i),
        )

    return glm4_moe.build_decoder(args, spec, RoPE(args.rope_dim, args.rope_theta, args.rope_scaling))


# Same tensor names as GLM-4.5.
sanitize = glm4_moe.sanitize
