"""ERNIE-4.5 MoE (baidu/ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B and ERNIE-4.5-MoE-shaped
models), as transformers' Ernie4_5_Moe runs them.

Differences from Mixtral:
- routing: softmax over all experts in fp32; the top k are chosen on the probabilities
  plus a per-expert correction bias (`moe_statics.e_score_correction_bias`) that never
  enters the weights; the k chosen probabilities are renormalised, their sum clamped
  from below at `moe_norm_min`;
- `moe_num_shared_experts` shared experts run on every token as one ungated MLP of width
  moe_intermediate_size * moe_num_shared_experts, added to the routed output;
- only layers i with (i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i
  <= moe_layer_end_index (-1: the last layer) are MoE; the others are dense MLPs of
  width `intermediate_size`;
- RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; rope theta defaults to 5e5;
- `use_bias` puts a bias on every projection: attention q/k/v/o, the dense and shared
  MLPs and the LM head (routed experts never have one).

Multi-token-prediction tensors (`mtp*`) are dropped, as transformers does: they only
serve speculative decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import GroupedRouter

DEFAULT_THETA = 500000.0  # Ernie4_5_MoeConfig.default_theta, used when the config names none


@dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are Ernie4_5_MoeConfig's, for config keys a checkpoint may leave out.
    num_key_value_heads: int | None = 4
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    intermediate_size: int = 12288  # dense (non-MoE) layers
    moe_intermediate_size: int = 1536  # one routed expert
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1: the last layer (resolved in __post_init__)
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    use_bias: bool = False

    ZERO_OK = BaseModelArgs.ZERO_OK | {"moe_num_shared_experts", "moe_layer_start_index", "moe_layer_end_index"}
    # transformers' attribute aliases, in case a config is written with them.
    ALIASES = {"moe_num_experts": "num_experts", "moe_k": "num_experts_per_tok"}
    LIMITS = {**BaseModelArgs.LIMITS, "moe_num_experts": 4096, "moe_layer_start_index": 1024,
              "moe_layer_end_index": 1024, "moe_layer_interval": 1024}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        config = dict(config)
        params = config.get("rope_parameters")
        if "rope_theta" not in config and not (isinstance(params, dict) and "rope_theta" in params):
            config["rope_theta"] = DEFAULT_THETA
        end = config.get("moe_layer_end_index")
        if end == -1 and not isinstance(end, bool):
            del config["moe_layer_end_index"]  # the default: the last layer
        return super().from_dict(config, source)

    def __post_init__(self):
        if self.moe_layer_end_index == -1:  # as Ernie4_5_MoeConfig.__post_init__ resolves it
            self.moe_layer_end_index = self.num_hidden_layers - 1

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.use_bias and self.tie_word_embeddings:
            raise ModelLoadError(f"{source}: use_bias with tie_word_embeddings (a biased LM head tied to the "
                                 "embedding) is not supported")

    @property
    def experts_per_layer(self) -> int:
        return self.moe_num_experts

    @property
    def top_k(self) -> int:
        return self.moe_k

    @property
    def expert_dim(self) -> int:
        return self.moe_intermediate_size

    def moe_layers(self) -> list[int]:
        return [
            i for i in range(self.num_hidden_layers)
            if (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        ]


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling, interleaved=True)
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.use_bias,
        o_bias=args.use_bias,
    )
    moe = set(args.moe_layers())
    H, act = args.hidden_size, args.hidden_act
    layers = []
    for i in range(args.num_hidden_layers):
        if i in moe:
            # transformers keeps this gate in fp32 whatever the model dtype.
            router = GroupedRouter(H, args.moe_num_experts, args.moe_k, True, scoring="softmax", correction=True,
                                   norm_min=args.moe_norm_min, float_logits=True)
            shared = args.moe_intermediate_size * args.moe_num_shared_experts
            mlp = MoEBlock(i, router, shared=MLP(H, shared, act, bias=args.use_bias) if shared else None)
        else:
            mlp = MLP(H, args.intermediate_size, act, bias=args.use_bias)
        layers.append(DecoderLayer(Attention(spec, rope), mlp, H, args.rms_norm_eps))
    return Transformer(args, layers, lm_head_bias=args.use_bias)


_rename = make_sanitizer(
    [
        (r"lm_head\.bias", "lm_head.bias"),
        (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", r"layers.\1.mlp.\2.bias"),
        (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.(weight|bias)",
         r"layers.\1.mlp.shared.\2.\3"),
    ]
)
# On disk under mlp.moe_statics, in transformers 5's memory under mlp.gate.moe_statics; (1, E).
_CORRECTION = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:gate\.)?moe_statics\.e_score_correction_bias$")
_MTP = re.compile(r"(?:^|\.)mtp")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours; the correction bias is flattened to (E,)."""
    if _MTP.search(name):
        return []
    m = _CORRECTION.match(name)
    if m:
        return [(f"layers.{m.group(1)}.mlp.router.e_score_correction_bias", tensor.reshape(-1))]
    return _rename(name, tensor)
