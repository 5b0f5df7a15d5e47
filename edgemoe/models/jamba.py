"""Jamba (ai21labs/AI21-Jamba-Mini-1.5, Jamba-Large-1.5 and Jamba-shaped models): Mamba
layers with attention every `attn_layer_period` layers and routed experts every
`expert_layer_period` layers.

Differences from Mixtral:
- layer i mixes tokens with attention when i % attn_layer_period == attn_layer_offset,
  otherwise with a Mamba-1 selective scan (mamba.Mamba: RMS norms on dt, B and C; a
  fixed-size conv window and scan state per sequence instead of a KV cache);
- attention has no positional encoding (positions come from the Mamba layers);
- layer i has routed experts when i % expert_layer_period == expert_layer_offset (and
  num_experts > 1), otherwise a dense MLP; both are `intermediate_size` wide;
- the router keeps the raw top-k softmax probabilities (no renormalisation);
- the final norm is named `final_layernorm`, the second block norm `pre_ff_layernorm`.
use_mamba_kernels, use_mambapy and use_associative_scan only pick transformers'
implementation of the same scan and are ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, _split_fused, make_sanitizer, short_repr
from .mamba import Mamba
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router


@dataclass
class ModelArgs(BaseModelArgs):
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 262144
    intermediate_size: int = 14336  # routed experts and dense MLPs
    num_experts: int = 16
    num_experts_per_tok: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False

    ZERO_OK = BaseModelArgs.ZERO_OK | {"expert_layer_offset", "attn_layer_offset"}
    ALIASES = {"num_experts": "num_local_experts"}
    LIMITS = {**BaseModelArgs.LIMITS, "mamba_d_state": 4096, "mamba_d_conv": 64, "mamba_expand": 64,
              "mamba_dt_rank": 1 << 17, "expert_layer_period": 1024, "attn_layer_period": 1024}

    def validate(self, source: str) -> None:
        super().validate(source)
        for kind in ("expert", "attn"):
            period, offset = getattr(self, f"{kind}_layer_period"), getattr(self, f"{kind}_layer_offset")
            if offset >= period:
                raise ModelLoadError(f"{source}: {kind}_layer_offset ({offset}) must be smaller than "
                                     f"{kind}_layer_period ({period})")
        if isinstance(self.mamba_dt_rank, str) and self.mamba_dt_rank != "auto":
            raise ModelLoadError(f"{source}: mamba_dt_rank must be a positive integer or \"auto\", "
                                 f"got {short_repr(self.mamba_dt_rank)}")

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else self.mamba_dt_rank

    def is_attention(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def expert_dim(self) -> int:
        return self.intermediate_size

    def moe_layers(self) -> list[int]:
        if self.num_experts <= 1:  # transformers: one "expert" is a dense MLP
            return []
        return [i for i in range(self.num_hidden_layers) if i % self.expert_layer_period == self.expert_layer_offset]


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    H, eps = args.hidden_size, args.rms_norm_eps
    spec = AttentionSpec(hidden=H, heads=args.num_attention_heads, kv_heads=args.num_key_value_heads,
                         head_dim=args.head_dim, use_rope=False)
    rope = RoPE(args.head_dim, args.rope_theta, None)  # required by Attention, never applied
    moe = set(args.moe_layers())
    layers = []
    for i in range(args.num_hidden_layers):
        if args.is_attention(i):
            mixer = Attention(spec, rope)
        else:
            mixer = Mamba(H, args.mamba_expand * H, args.mamba_d_state, args.mamba_d_conv, args.dt_rank,
                          args.mamba_conv_bias, args.mamba_proj_bias, args.hidden_act, eps)
        if i in moe:
            mlp = MoEBlock(i, Router(H, args.num_experts, args.num_experts_per_tok, norm_topk=False))
        else:
            mlp = MLP(H, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(mixer, mlp, H, eps))
    return Transformer(args, layers)


_M = r"model\.layers\.(\d+)\.mamba\."
_rename = make_sanitizer([
    (r"model\.final_layernorm\.weight", "norm.weight"),
    (r"model\.layers\.(\d+)\.pre_ff_layernorm\.weight", r"layers.\1.norm2.weight"),
    (_M + r"(in_proj|x_proj|dt_proj|out_proj)\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (_M + r"conv1d\.(weight|bias)", r"layers.\1.attn.conv_\2"),
    (_M + r"(A_log|D)", r"layers.\1.attn.\2"),
    (_M + r"(dt|b|c)_layernorm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.router\.weight", r"layers.\1.mlp.router.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight", r"experts.\1.\2.\3"),
    (r"model\.layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2.weight"),
])
_FUSED = re.compile(r"model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours; fused expert tensors are split per expert."""
    if m := _FUSED.match(name):
        return _split_fused(int(m.group(1)), m.group(2), name, tensor)
    return _rename(name, tensor)
