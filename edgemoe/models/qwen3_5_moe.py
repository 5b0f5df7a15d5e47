"""Qwen3.5-MoE text model (Qwen/Qwen3.5-35B-A3B, Qwen3.5-397B-A17B and Qwen3.5-MoE-shaped
models).

Released checkpoints are multimodal (model_type "qwen3_5_moe": the language model in
`text_config`, its weights under `model.language_model.`); the vision tower
(`model.visual.*`) is skipped. A text-only "qwen3_5_moe_text" config is read as it is.

The network is Qwen3-Next's (qwen3_next.py) with these differences:
- the Gated DeltaNet's input projections are separate (`in_proj_qkv`, `in_proj_z`,
  `in_proj_b`, `in_proj_a`) instead of grouped per key head;
- every layer is MoE (no dense layers) and the top-k weights are always renormalised;
- the rope is multimodal (mrope sections over time/height/width positions); for text all
  three positions are the token's, which is plain RoPE on the rotated channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from . import qwen3_next
from .base import Transformer, short_repr

sanitize = qwen3_next.sanitize


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    num_experts: int = 256
    num_experts_per_tok: int = 8

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Read the text part of a qwen3_5_moe (multimodal) or qwen3_5_moe_text config."""
        if config.get("model_type") == "qwen3_5_moe":
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ModelLoadError(f"{source}: text_config must be an object, got {short_repr(text)}")
            # The top-level flag decides whether the multimodal model ties its head.
            config = {**text, "model_type": "qwen3_5_moe",
                      "tie_word_embeddings": config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
            source = f"{source}: text_config"
        return super().from_dict(config, source)

    def __post_init__(self):
        # transformers' Qwen3.5 text config has no dense layers and always renormalises.
        self.norm_topk_prob, self.decoder_sparse_step, self.mlp_only_layers = True, 1, []
        super().__post_init__()

    def validate(self, source: str) -> None:
        if not self.num_experts:
            raise ModelLoadError(f"{source}: num_experts must be positive (every Qwen3.5-MoE layer is MoE), got 0")
        super().validate(source)

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    return qwen3_next.build_hybrid(args, grouped=False)
