"""MiniMax-M2 (MiniMaxAI/MiniMax-M2; model_type minimax_m2).

Differences from Mixtral:
- sigmoid router scores; a learned per-expert `e_score_correction_bias` (stored on the
  MoE block) added only to choose the top k; the chosen scores are always renormalised
  to sum to one (no groups, no scaling);
- RMSNorm over the whole query and key projections (width heads*head_dim and
  kv_heads*head_dim), before the heads are split;
- partial RoPE: `rotary_dim` channels of each head (written as partial_rotary_factor
  = rotary_dim / head_dim by transformers 5);
- an explicit head_dim (128 when absent) and rope theta 5e6 when absent.
Released configs carry switches of the original code (scoring_func, use_routing_bias,
use_qk_norm, qk_norm_type, shared_intermediate_size, attn_type_list) that transformers
does not read; values other than the released model's are refused. The
multi-token-prediction modules (use_mtp) are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, DecoderLayer, Transformer, make_sanitizer
from .glm4_moe import check_rope_dim, lift_rope_key
from .moe import MoEBlock
from .rope import RoPE
from .routers import GroupedRouter


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 1536  # one routed expert
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    head_dim: int | None = 128
    rotary_dim: int | None = None
    partial_rotary_factor: float | None = None
    max_position_embeddings: int = 196608
    # The original code's switches; only the released model's values are implemented.
    scoring_func: str = "sigmoid"
    use_routing_bias: bool = True
    use_qk_norm: bool = True
    qk_norm_type: str = "per_layer"
    shared_intermediate_size: int = 0
    attn_type_list: list[int] | None = None  # 1 = softmax attention, 0 = MiniMax-01's linear attention

    ZERO_OK = BaseModelArgs.ZERO_OK | {"shared_intermediate_size", "attn_type_list"}
    ALIASES = {"num_local_experts": "num_experts"}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        config = lift_rope_key(config, "partial_rotary_factor")
        if "rope_theta" not in config:
            config = {**config, "rope_theta": 5000000.0}  # MiniMaxM2Config.default_theta
        return super().from_dict(config, source)

    def validate(self, source: str) -> None:
        super().validate(source)
        released = {"scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True,
                    "qk_norm_type": "per_layer", "shared_intermediate_size": 0}
        for name, value in released.items():
            if getattr(self, name) != value:
                raise ModelLoadError(f"{source}: {name} {getattr(self, name)!r} is not supported "
                                     f"(MiniMax-M2 is implemented with {value!r})")
        if self.attn_type_list is not None and set(self.attn_type_list) - {1}:
            raise ModelLoadError(f"{source}: attn_type_list asks for linear attention (0), which minimax_m2 "
                                 "does not implement")
        if self.rotary_dim is not None and self.rotary_dim > self.head_dim:
            raise ModelLoadError(f"{source}: rotary_dim {self.rotary_dim} exceeds head_dim {self.head_dim}")
        check_rope_dim(self.head_dim, self.rope_factor, self.rope_dim, source)

    @property
    def rope_factor(self) -> float:
        """partial_rotary_factor as transformers derives it (from rotary_dim when unset)."""
        if self.partial_rotary_factor is not None:
            return self.partial_rotary_factor
        return 1.0 if self.rotary_dim is None else self.rotary_dim / self.head_dim

    @property
    def rope_dim(self) -> int:
        """Leading channels of each head that RoPE rotates."""
        return int(self.head_dim * self.rope_factor)

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
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.rope_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qk_norm="full",
        norm_eps=args.rms_norm_eps,
    )
    layers = []
    for i in range(args.num_hidden_layers):
        # Plain sum renormalisation (no eps), as transformers divides.
        router = GroupedRouter(args.hidden_size, args.num_local_experts, args.num_experts_per_tok, norm_topk=True,
                               scoring="sigmoid", correction=True, norm_eps=0.0)
        layers.append(DecoderLayer(Attention(spec, rope), MoEBlock(i, router), args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


# MiniMax's names on disk (Mixtral's w1 = gate, w3 = up, w2 = down; the correction bias
# sits on the MoE block); the rest are common names.
sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.mlp.router.weight"),
        (r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.e_score_correction_bias",
         r"layers.\1.mlp.router.e_score_correction_bias"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"experts.\1.\2.gate"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"experts.\1.\2.up"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"experts.\1.\2.down"),
    ]
)
