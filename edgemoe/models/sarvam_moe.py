"""Sarvam-MoE (sarvamai/sarvam-30b and Sarvam-MoE-shaped models). transformers runs it
with the GLM-4.5 model code, and so do we (glm4_moe.py: DeepSeek-V3 routing with groups,
an fp32 gate and a correction bias used only to choose, shared experts, the first
`first_k_dense_replace` layers dense, per-head q/k norms with `use_qk_norm`, a q/k/v
bias with `attention_bias`).

Differences from GLM-4.5:
- defaults: RoPE over the whole head (partial_rotary_factor 1.0), rope theta 8e6, q/k
  norms on, 4 KV heads of 64 channels, routed_scaling_factor 2.5;
- the original config names num_experts, num_shared_experts and use_qkv_bias;
- checkpoints keep the original (Bailing-style) tensor names, which transformers also
  writes back: word_embeddings, one fused attention.query_key_value (rows [q | k | v]),
  attention.dense, query_layernorm / key_layernorm, mlp.gate.expert_bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from . import glm4_moe
from .attention import AttentionSpec
from .base import Transformer, make_sanitizer
from .rope import RoPE

DEFAULT_THETA = 8_000_000.0


@dataclass
class ModelArgs(glm4_moe.ModelArgs):
    num_key_value_heads: int | None = 4
    head_dim: int | None = 64
    intermediate_size: int = 8192
    moe_intermediate_size: int = 1024
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 2.5
    use_qk_norm: bool = True
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-6

    # The names of the original sarvam-30b config.json (transformers' attribute_map).
    ALIASES = {"n_routed_experts": "num_experts", "n_shared_experts": "num_shared_experts",
               "attention_bias": "use_qkv_bias"}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """As GLM-4.5's, with transformers' rope theta for this family (8e6) when the
        config gives none."""
        blocks = [config.get(k) for k in ("rope_scaling", "rope_parameters")]
        if "rope_theta" not in config and not any(isinstance(b, dict) and "rope_theta" in b for b in blocks):
            config = {**config, "rope_theta": DEFAULT_THETA}
        return super().from_dict(config, source)


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        qk_norm="head" if args.use_qk_norm else None,
        norm_eps=args.rms_norm_eps,
        fused_qkv=True,
    )
    return glm4_moe.build_decoder(args, lambda i: spec, RoPE(args.rope_dim, args.rope_theta, args.rope_scaling))


_rename = make_sanitizer([
    (r"model\.word_embeddings\.weight", "embed.weight"),
    (r"model\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"model\.layers\.(\d+)\.attention\.dense\.weight", r"layers.\1.attn.o.weight"),
    (r"model\.layers\.(\d+)\.attention\.query_layernorm\.weight", r"layers.\1.attn.q_norm.weight"),
    (r"model\.layers\.(\d+)\.attention\.key_layernorm\.weight", r"layers.\1.attn.k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.expert_bias", r"layers.\1.mlp.router.e_score_correction_bias"),
    *glm4_moe.RULES,
])
_SPLIT_QKV = re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours; the zero-element shared-expert matrices a config with
    n_shared_experts 0 stores are dropped. Attention loads from the fused
    query_key_value that Sarvam checkpoints (and transformers' save_pretrained) hold."""
    if ".shared_experts." in name and tensor.numel() == 0:
        return []
    if _SPLIT_QKV.match(name):
        raise ModelLoadError(f"tensor {name!r}: separate q/k/v projections are not supported for sarvam_moe "
                             "(expected the fused attention.query_key_value)")
    return _rename(name, tensor)
