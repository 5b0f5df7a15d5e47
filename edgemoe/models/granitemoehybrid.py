"""Granite 4.0-H (ibm-granite/granite-4.0-h-tiny, -h-small and GraniteMoeHybrid-shaped
models): Mamba-2 layers and attention layers, each followed by routed experts plus a
shared MLP.

Granite MoE with a shared expert (granitemoeshared.py: the four multipliers, top-k then
softmax routing, fused `input_linear`/`output_linear` tensors) plus:
- `layer_types` (or `layers_block_type`; legacy names "mamba" and "attention" accepted):
  "linear_attention" layers mix tokens with a Mamba-2 scan (mamba.Mamba2: a fixed-size
  conv window and state per sequence instead of a KV cache), "full_attention" layers
  with attention;
- RoPE only with position_embedding_type "rope" (None or "nope": no positional encoding);
- dt is clamped to `time_step_limit` (transformers' default (0, inf) clamps nothing).
A dense variant (num_local_experts 0) has nothing to offload and is refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from . import granitemoe, granitemoeshared
from .attention import Attention, AttentionSpec
from .base import MLP, ScaledDecoderLayer, Transformer, short_repr
from .mamba import Mamba2
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router

LAYER_TYPES = ("linear_attention", "full_attention")
LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}


@dataclass
class ModelArgs(granitemoeshared.ModelArgs):
    shared_intermediate_size: int = 1024
    position_embedding_type: str | None = None
    layer_types: list[str] | None = None
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)  # read by from_dict (it may hold infinity)

    ZERO_OK = granitemoeshared.ModelArgs.ZERO_OK | {"num_local_experts"}
    ALIASES = {"layer_types": "layers_block_type"}
    LIMITS = {**granitemoeshared.ModelArgs.LIMITS, "mamba_n_heads": 4096, "mamba_n_groups": 4096,
              "mamba_d_state": 4096, "mamba_d_head": 4096, "mamba_d_conv": 64, "mamba_expand": 64,
              "mamba_chunk_size": 1 << 16}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """As BaseModelArgs.from_dict, with time_step_limit read here: a pair low <= high,
        high possibly infinite (JSON Infinity, "Infinity" or transformers' {"__float__": ...})."""
        limit = config.get("time_step_limit")
        args = super().from_dict({k: v for k, v in config.items() if k != "time_step_limit"}, source)
        if limit is not None:
            args.time_step_limit = _time_step_limit(limit, source)
        return args

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers  # transformers' default
        self.layer_types = [LEGACY.get(t, t) for t in self.layer_types]

    def validate(self, source: str) -> None:
        if not self.num_local_experts:
            raise ModelLoadError(f"{source}: num_local_experts 0 (a dense Granite 4.0-H) has no experts to offload")
        super().validate(source)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(map(str, unknown))} "
                                 f"(supported: {', '.join(LAYER_TYPES)}, or mamba / attention)")
        if self.position_embedding_type not in (None, "nope", "rope"):
            raise ModelLoadError(f"{source}: position_embedding_type {short_repr(self.position_embedding_type)} is "
                                 "not supported (supported: null, \"nope\", \"rope\")")
        inner, heads, groups = self.mamba_inner, self.mamba_n_heads, self.mamba_n_groups
        if isinstance(self.mamba_d_head, str) and self.mamba_d_head != "auto":
            raise ModelLoadError(f"{source}: mamba_d_head must be a positive integer or \"auto\", "
                                 f"got {short_repr(self.mamba_d_head)}")
        if inner % heads or self.mamba_head_dim * heads != inner:
            raise ModelLoadError(f"{source}: mamba_n_heads ({heads}) x mamba_d_head ({self.mamba_d_head}) must equal "
                                 f"mamba_expand x hidden_size ({inner})")
        if heads % groups:
            raise ModelLoadError(f"{source}: mamba_n_heads ({heads}) is not a multiple of mamba_n_groups ({groups})")

    @property
    def mamba_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_head_dim(self) -> int:
        return self.mamba_inner // self.mamba_n_heads if self.mamba_d_head == "auto" else self.mamba_d_head


def _time_step_limit(value, source: str) -> tuple[float, float]:
    def number(x):
        if isinstance(x, dict) and set(x) == {"__float__"}:
            x = x["__float__"]
        if isinstance(x, str) and x.lower() in ("infinity", "inf"):
            return math.inf
        return x if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) else None

    pair = [number(x) for x in value] if isinstance(value, list) else []
    if len(pair) != 2 or None in pair or not 0 <= pair[0] <= pair[1] or math.isinf(pair[0]):
        raise ModelLoadError(f"{source}: time_step_limit must be a pair [low, high] with 0 <= low <= high "
                             f"(high may be Infinity), got {short_repr(value)}")
    return float(pair[0]), float(pair[1])


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    H, eps = args.hidden_size, args.rms_norm_eps
    spec = AttentionSpec(hidden=H, heads=args.num_attention_heads, kv_heads=args.num_key_value_heads,
                         head_dim=args.head_dim, qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                         scale=args.attention_multiplier, use_rope=args.position_embedding_type == "rope")
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)  # applied only with use_rope
    layers = []
    for i, kind in enumerate(args.layer_types):
        if kind == "full_attention":
            mixer = Attention(spec, rope)
        else:
            mixer = Mamba2(H, args.mamba_inner, args.mamba_n_heads, args.mamba_head_dim, args.mamba_n_groups,
                           args.mamba_d_state, args.mamba_d_conv, args.mamba_conv_bias, args.mamba_proj_bias,
                           args.hidden_act, eps, args.time_step_limit, args.mamba_chunk_size)
        width = args.shared_intermediate_size
        moe = MoEBlock(i, Router(H, args.num_local_experts, args.num_experts_per_tok, norm_topk=True),
                       shared=MLP(H, width, args.hidden_act) if width else None)
        layers.append(ScaledDecoderLayer(mixer, moe, H, eps, args.residual_multiplier))
    return granitemoe.finish(args, layers)


_MAMBA = re.compile(r"model\.layers\.(\d+)\.mamba\.(.+)$")
_MAMBA_NAMES = {"in_proj.weight": "in_proj.weight", "in_proj.bias": "in_proj.bias", "out_proj.weight":
                "out_proj.weight", "out_proj.bias": "out_proj.bias", "conv1d.weight": "conv_weight",
                "conv1d.bias": "conv_bias", "A_log": "A_log", "D": "D", "dt_bias": "dt_bias",
                "norm.weight": "norm.weight"}


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Granite MoE (shared) names plus the Mamba-2 layers'; a zero-width shared MLP
    (shared_intermediate_size 0) stores empty tensors, which are dropped."""
    m = _MAMBA.match(name)
    if m and m.group(2) in _MAMBA_NAMES:
        return [(f"layers.{m.group(1)}.attn.{_MAMBA_NAMES[m.group(2)]}", tensor)]
    if ".shared_mlp." in name and tensor.numel() == 0:
        return []
    return granitemoeshared.sanitize(name, tensor)
