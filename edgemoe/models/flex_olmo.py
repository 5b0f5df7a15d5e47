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

from ..errors import ModelLoadError
from . import olmoe
from .base import PostNormDecoderLayer, Transformer, make_sanitizer

DEFAULT_THETA = 500000.0  # FlexOlmoConfig.default_theta, used when the config names none


@dataclass
class ModelArgs(olmoe.ModelArgs):
    """OLMoE's fields with FlexOlmo's defaults; clip_qkv is not part of FlexOlmo."""

    intermediate_size: int = 11008  # one routed expert
    num_experts: int = 7
    num_experts_per_tok: int = 5

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        params = config.get("rope_parameters")
        if "rope_theta" not in config and not (isinstance(params, dict) and "rope_theta" in params):
            config = {**config, "rope_theta": DEFAULT_THETA}
        return super().from_dict(config, source)

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.clip_qkv is not None:
            raise ModelLoadError(f"{source}: clip_qkv is not supported for FlexOlmo (transformers does not clip)")


def build(args: ModelArgs) -> Transformer:
    """OLMoE's decoder stack with OLMo2's post-norm blocks."""
    return olmoe.build(args, PostNormDecoderLayer)


# The two post-norms: norm1 follows attention, norm2 the MoE block (PostNormDecoderLayer).
# Every other name (full-width q/k norms, mlp.gate, mlp.experts.N.*_proj) is a common one.
sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.norm1.weight"),
        (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", r"layers.\1.norm2.weight"),
    ]
)
