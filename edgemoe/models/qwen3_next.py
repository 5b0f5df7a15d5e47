"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B and Qwen3-Next-shaped models): a hybrid of Gated
DeltaNet linear attention and gated full attention, with routed + shared experts.

Differences from Qwen3-MoE:
- `layer_types`: "linear_attention" layers mix tokens with a Gated DeltaNet
  (recurrent.GatedDeltaNet: a causal conv, then the gated delta rule with a fixed-size
  state per sequence), "full_attention" layers (by default every `full_attention_interval`-th)
  with attention whose q projection also yields a per-head output gate (sigmoid);
- every RMSNorm (block norms, final norm, q/k norms) is zero-centred: it scales by
  (1 + weight), in fp32; the DeltaNet's output norm is a plain gated RMSNorm;
- RoPE on the first `partial_rotary_factor` of each head (default a quarter);
- a shared expert gated by sigmoid(shared_expert_gate(x)) next to the routed experts;
  dense MLP layers by `mlp_only_layers` / `decoder_sparse_step`;
- `mtp.*` (multi-token prediction) tensors are not used and are skipped.
The Qwen3.5-MoE text model (qwen3_5_moe.py) is the same network with another projection layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..cpu import Linear
from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, is_moe_layer, make_sanitizer
from .moe import MoEBlock
from .norms import RMSNorm
from .recurrent import GatedDeltaNet, wide
from .rope import RoPE
from .routers import Router

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    num_key_value_heads: int | None = 2
    head_dim: int | None = 256
    max_position_embeddings: int = 32768
    intermediate_size: int = 5632  # dense (non-MoE) layers
    moe_intermediate_size: int = 512  # one routed expert
    shared_expert_intermediate_size: int = 512
    num_experts: int = 512
    num_experts_per_tok: int = 10
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    attention_bias: bool = False
    layer_types: list[str] | None = None
    full_attention_interval: int = 4  # read only when layer_types is absent
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    partial_rotary_factor: float = 0.25  # transformers' default for this family

    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_experts", "num_experts_per_tok", "mlp_only_layers",
                                       "shared_expert_intermediate_size"}
    ALIASES = {"num_experts": "num_local_experts"}
    LIMITS = {**BaseModelArgs.LIMITS, "partial_rotary_factor": 1.0, "linear_conv_kernel_dim": 64,
              "linear_key_head_dim": 4096, "linear_value_head_dim": 4096, "linear_num_key_heads": 4096,
              "linear_num_value_heads": 4096, "full_attention_interval": 1024}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """As BaseModelArgs.from_dict; partial_rotary_factor may also sit in the rope parameters."""
        if "partial_rotary_factor" not in config:
            for key in ("rope_parameters", "rope_scaling"):
                block = config.get(key)
                if isinstance(block, dict) and "partial_rotary_factor" in block:
                    config = {**config, "partial_rotary_factor": block["partial_rotary_factor"]}
        return super().from_dict(config, source)

    def __post_init__(self):
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.layer_types is None:
            self.layer_types = [LAYER_TYPES[(i + 1) % self.full_attention_interval == 0]
                                for i in range(self.num_hidden_layers)]

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.attention_bias:
            raise ModelLoadError(f"{source}: attention_bias true is not supported (the query's output gate "
                                 "would need a bias of its own)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(map(str, unknown))} "
                                 f"(supported: {', '.join(LAYER_TYPES)})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ModelLoadError(f"{source}: linear_num_value_heads ({self.linear_num_value_heads}) is not a multiple "
                                 f"of linear_num_key_heads ({self.linear_num_key_heads})")
        rotary = self.rotary_dim
        if rotary < 2 or rotary % 2:
            raise ModelLoadError(f"{source}: partial_rotary_factor {self.partial_rotary_factor} of head_dim "
                                 f"{self.head_dim} gives {rotary} rotated channels; RoPE needs a positive even number")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

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
        return [i for i in range(self.num_hidden_layers)
                if is_moe_layer(i, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers)]


class OffsetRMSNorm(RMSNorm):
    """Zero-centred RMSNorm: x / rms(x) * (1 + weight), all in fp32 before the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(wide(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.to(xf.dtype))).to(x.dtype)


def build_hybrid(args: ModelArgs, grouped: bool) -> Transformer:
    """The decoder stack; `grouped` picks Qwen3-Next's DeltaNet projection layout (see
    recurrent.GatedDeltaNet), otherwise Qwen3.5's."""
    H, eps = args.hidden_size, args.rms_norm_eps
    rope = RoPE(args.rotary_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(hidden=H, heads=args.num_attention_heads, kv_heads=args.num_key_value_heads,
                         head_dim=args.head_dim, qk_norm="head", norm_eps=eps, query_gate=True)
    moe = set(args.moe_layers())
    layers = []
    for i, kind in enumerate(args.layer_types):
        if kind == "full_attention":
            mixer = Attention(spec, rope)
            mixer.q_norm, mixer.k_norm = OffsetRMSNorm(args.head_dim, eps), OffsetRMSNorm(args.head_dim, eps)
        else:
            mixer = GatedDeltaNet(H, args.linear_num_key_heads, args.linear_num_value_heads, args.linear_key_head_dim,
                                  args.linear_value_head_dim, args.linear_conv_kernel_dim, args.hidden_act, eps,
                                  grouped=grouped)
        if i in moe:
            shared = args.shared_expert_intermediate_size
            mlp = MoEBlock(i, Router(H, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob),
                           shared=MLP(H, shared, args.hidden_act) if shared else None,
                           shared_gate=Linear(H, 1, bias=False))  # in every checkpoint, even without a shared expert
        else:
            mlp = MLP(H, args.intermediate_size, args.hidden_act)
        layer = DecoderLayer(mixer, mlp, H, eps)
        layer.norm1, layer.norm2 = OffsetRMSNorm(H, eps), OffsetRMSNorm(H, eps)
        layers.append(layer)
    model = Transformer(args, layers)
    model.norm = OffsetRMSNorm(H, eps)
    return model


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    return build_hybrid(args, grouped=True)


_rename = make_sanitizer([
    (r"model\.layers\.(\d+)\.linear_attn\.in_proj_(qkvz|ba|qkv|z|b|a)\.weight", r"layers.\1.attn.in_\2.weight"),
    (r"model\.layers\.(\d+)\.linear_attn\.conv1d\.weight", r"layers.\1.attn.conv_weight"),
    (r"model\.layers\.(\d+)\.linear_attn\.(A_log|dt_bias)", r"layers.\1.attn.\2"),
    (r"model\.layers\.(\d+)\.linear_attn\.norm\.weight", r"layers.\1.attn.norm.weight"),
    (r"model\.layers\.(\d+)\.linear_attn\.out_proj\.weight", r"layers.\1.attn.out.weight"),
])
# Not part of the text model: multi-token prediction, and the multimodal checkpoints' vision tower.
_SKIP = re.compile(r"^(mtp\.|model\.visual\.)")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours (also Qwen3.5-MoE's, whose multimodal checkpoints put
    the language model under `model.language_model.`). Zero-element shared-expert
    matrices (shared_expert_intermediate_size 0) hold nothing and are dropped."""
    if _SKIP.match(name) or (".shared_expert." in name and tensor.numel() == 0):
        return []
    return _rename(re.sub(r"^model\.language_model\.", "model.", name), tensor)

