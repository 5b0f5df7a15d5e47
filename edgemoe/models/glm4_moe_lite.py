"""GLM-4.7-Flash (zai-org/GLM-4.7-Flash and glm4_moe_lite-shaped models).

DeepSeek-V3's architecture (multi-head latent attention, the sigmoid "noaux_tc" router
with correction bias, shared experts) with its own sizes and defaults. Which layers are
dense comes from `mlp_layer_types` ("dense"/"sparse" per layer); configs without it
get the first `first_k_dense_replace` (default 1) layers dense, as transformers' default
does. The multi-token-prediction layer model.layers.47 is skipped, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .base import Transformer
from .deepseek_v3 import ModelArgs as V3Args
from .deepseek_v3 import router
from .mla import build_mla, make_mla_sanitizer

LAYER_TYPES = ("dense", "sparse")


@dataclass
class ModelArgs(V3Args):
    max_position_embeddings: int = 202752
    rms_norm_eps: float = 1e-5
    intermediate_size: int = 10240
    moe_intermediate_size: int = 1536
    n_routed_experts: int = 64
    n_shared_experts: int = 1
    num_experts_per_tok: int | None = 4
    routed_scaling_factor: float = 1.8
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = 768
    qk_nope_head_dim: int = 192
    v_head_dim: int = 256
    mlp_layer_types: list[str] | None = None

    # transformers' Glm4MoeLiteConfig maps head_dim onto qk_rope_head_dim.
    ALIASES = {**V3Args.ALIASES, "qk_rope_head_dim": "head_dim"}

    def __post_init__(self):
        super().__post_init__()
        if self.mlp_layer_types is None:
            k = min(self.first_k_dense_replace, self.num_hidden_layers)
            self.mlp_layer_types = ["dense"] * k + ["sparse"] * (self.num_hidden_layers - k)

    def validate(self, source: str) -> None:
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"{source}: mlp_layer_types has {len(self.mlp_layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.mlp_layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported mlp_layer_types entries: {', '.join(unknown)} "
                                 f"(supported: {', '.join(LAYER_TYPES)})")
        if self.moe_layer_freq != 1:  # the layer kinds come from mlp_layer_types alone
            raise ModelLoadError(f"{source}: moe_layer_freq {self.moe_layer_freq} is not supported by "
                                 "glm4_moe_lite (set mlp_layer_types)")
        super().validate(source)

    def moe_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.mlp_layer_types) if kind == "sparse"]


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    return build_mla(args, router, interleaved=args.rope_interleave)


sanitize = make_mla_sanitizer(skip_mtp=True)
