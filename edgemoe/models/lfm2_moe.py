"""LFM2-MoE (LiquidAI/LFM2-8B-A1B and LFM2-MoE-shaped models): gated short convolutions
interleaved with attention, dense MLPs in the first layers and routed experts after.

Differences from Mixtral:
- `layer_types`: "conv" layers mix tokens with a gated short convolution
  (recurrent.ShortConv: y = c * conv(b * x), a depthwise causal kernel of
  `conv_L_cache` taps, whose last inputs are the layer's only state), "full_attention"
  layers with GQA attention with per-head q/k RMSNorm;
- the first `num_dense_layers` layers have a dense MLP (w1/w3/w2), the rest routed experts;
- the router scores experts with a sigmoid, chooses by score + `expert_bias` (load
  balancing; not in the weights), renormalises the chosen scores (+1e-6) and multiplies
  them by `routed_scaling_factor` (GroupedRouter);
- the final norm is named `embedding_norm`; norms use `norm_eps`; tied head by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, _split_fused, make_sanitizer
from .moe import MoEBlock
from .recurrent import ShortConv
from .rope import RoPE
from .routers import GroupedRouter

LAYER_TYPES = ("conv", "full_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    intermediate_size: int = 7168  # dense layers
    moe_intermediate_size: int = 1792  # one routed expert
    num_dense_layers: int = 2
    num_experts: int = 32
    num_experts_per_tok: int = 4
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    conv_bias: bool = False
    conv_L_cache: int = 3
    layer_types: list[str] | None = None
    full_attn_idxs: list[int] | None = None  # older configs: the attention layers' indices

    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_dense_layers", "full_attn_idxs"}
    ALIASES = {"rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embedding"}
    LIMITS = {**BaseModelArgs.LIMITS, "conv_L_cache": 64, "num_dense_layers": 1024}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """As BaseModelArgs.from_dict; a config naming no rope theta gets LFM2's 1e6."""
        if not any(k in config for k in ("rope_theta", "rope_parameters", "rope_scaling")):
            config = {**config, "rope_theta": 1000000.0}
        return super().from_dict(config, source)

    def __post_init__(self):
        if self.layer_types is None and self.full_attn_idxs is not None:
            attn = set(self.full_attn_idxs)
            self.layer_types = [LAYER_TYPES[i in attn] for i in range(self.num_hidden_layers)]

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.layer_types is None:
            raise ModelLoadError(f"{source}: layer_types (or full_attn_idxs) is required")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(map(str, unknown))} "
                                 f"(supported: {', '.join(LAYER_TYPES)})")

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
        return list(range(min(self.num_dense_layers, self.num_hidden_layers), self.num_hidden_layers))


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    H, eps = args.hidden_size, args.rms_norm_eps
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(hidden=H, heads=args.num_attention_heads, kv_heads=args.num_key_value_heads,
                         head_dim=args.head_dim, qk_norm="head", norm_eps=eps)
    moe = set(args.moe_layers())
    layers = []
    for i, kind in enumerate(args.layer_types):
        mixer = Attention(spec, rope) if kind == "full_attention" else ShortConv(H, args.conv_L_cache, args.conv_bias)
        if i in moe:
            router = GroupedRouter(H, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob,
                                   scoring="sigmoid", correction=args.use_expert_bias, norm_eps=1e-6,
                                   scaling=args.routed_scaling_factor)
            mlp = MoEBlock(i, router)
        else:
            mlp = MLP(H, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(mixer, mlp, H, eps))
    return Transformer(args, layers)


_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}

_rename = make_sanitizer([
    (r"model\.embedding_norm\.weight", "norm.weight"),
    (r"model\.layers\.(\d+)\.operator_norm\.weight", r"layers.\1.norm1.weight"),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", r"layers.\1.norm2.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.out_proj\.weight", r"layers.\1.attn.o.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_layernorm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"model\.layers\.(\d+)\.conv\.(in_proj|out_proj)\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.conv\.conv\.(weight|bias)", r"layers.\1.attn.conv_\2"),
    (r"model\.layers\.(\d+)\.feed_forward\.gate\.weight", r"layers.\1.mlp.router.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.expert_bias", r"layers.\1.mlp.router.e_score_correction_bias"),
])
_DENSE = re.compile(r"model\.layers\.(\d+)\.feed_forward\.(w[123])\.weight$")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED = re.compile(r"model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours: w1/w3/w2 are gate/up/down (dense MLPs and experts,
    stored per expert or fused as transformers keeps them in memory)."""
    if m := _DENSE.match(name):
        return [(f"layers.{m.group(1)}.mlp.{_PARTS[m.group(2)]}.weight", tensor)]
    if m := _EXPERT.match(name):
        return [(f"experts.{m.group(1)}.{m.group(2)}.{_PARTS[m.group(3)]}", tensor)]
    if m := _FUSED.match(name):
        return _split_fused(int(m.group(1)), m.group(2), name, tensor)
    return _rename(name, tensor)
