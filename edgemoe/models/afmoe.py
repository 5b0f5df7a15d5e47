"""AFMoE (arcee-ai/Trinity-Mini, Trinity-Nano and AFMoE-shaped models).

Differences from Mixtral:
- sigmoid routing: top-k of sigmoid(logits) + `expert_bias` (a load-balancing bias used
  only to choose), the chosen sigmoid scores always renormalised, times `route_scale`;
- shared experts of width moe_intermediate_size * num_shared_experts on every MoE layer;
- the first `num_dense_layers` layers are dense MLPs of width `intermediate_size`;
- attention: per-head RMSNorm on q and k, biases on all four projections with
  `attention_bias`, and the output gated by sigmoid(gate_proj(x)) before o_proj;
- hybrid attention by `layer_types` (default: every `global_attn_every_n_layers`-th
  layer global, the others sliding); only the sliding layers use RoPE;
- "sandwich" norms: each of attention and MLP is normed before and after, then added;
- with `mup_enabled` the embeddings are scaled by sqrt(hidden_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec, KVCache
from .base import MLP, BaseModelArgs, Transformer, make_sanitizer
from .moe import MoEBlock
from .norms import RMSNorm
from .rope import RoPE
from .routers import GroupedRouter


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 6144  # dense layers
    moe_intermediate_size: int = 1408  # one routed expert
    num_dense_layers: int = 1
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    route_scale: float = 1.0
    global_attn_every_n_layers: int | None = 4
    sliding_window: int | None = 1024
    layer_types: list[str] | None = None
    attention_bias: bool = False
    mup_enabled: bool = False
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 16384

    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_dense_layers", "num_shared_experts"}
    LIMITS = {**BaseModelArgs.LIMITS, "num_shared_experts": 4096}

    def validate(self, source: str) -> None:
        L = self.num_hidden_layers
        if self.layer_types is None:
            n = self.global_attn_every_n_layers
            if n is None:
                raise ModelLoadError(f"{source}: global_attn_every_n_layers is null and there are no layer_types")
            self.layer_types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(L)]
        if len(self.layer_types) != L:
            raise ModelLoadError(f"{source}: layer_types has {len(self.layer_types)} entries for {L} layers")
        unknown = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(unknown)}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ModelLoadError(f"{source}: layer_types has sliding_attention layers but sliding_window is null")
        super().validate(source)

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
        return list(range(self.num_dense_layers, self.num_hidden_layers))


class SandwichDecoderLayer(nn.Module):
    """x + post_attn_norm(attn(norm1(x))), then + post_mlp_norm(mlp(norm2(x)))."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.norm1, self.post_attn_norm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.norm2, self.post_mlp_norm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.norm1(x), cache))  # (B, T, H)
        return x + self.post_mlp_norm(self.mlp(self.norm2(x)))


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    moe = set(args.moe_layers())
    shared = args.moe_intermediate_size * args.num_shared_experts
    layers = []
    for i in range(args.num_hidden_layers):
        sliding = args.layer_types[i] == "sliding_attention"
        spec = AttentionSpec(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=args.sliding_window if sliding else None,
            use_rope=sliding,  # global layers have no position encoding
            output_gate=True,
        )
        if i in moe:
            router = GroupedRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, True,
                                   scoring="sigmoid", correction=True, scaling=args.route_scale)
            mlp = MoEBlock(i, router, shared=MLP(args.hidden_size, shared, args.hidden_act) if shared else None)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(SandwichDecoderLayer(Attention(spec, rope), mlp, args.hidden_size, args.rms_norm_eps))
    model = Transformer(args, layers)
    if args.mup_enabled:
        model.embed_scale = args.hidden_size**0.5
    return model


_rename = make_sanitizer([
    (r"model\.layers\.(\d+)\.self_attn\.gate_proj\.weight", r"layers.\1.attn.gate.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.post_attn_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_mlp_layernorm\.weight", r"layers.\1.norm2.weight"),
    (r"model\.layers\.(\d+)\.post_mlp_layernorm\.weight", r"layers.\1.post_mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.router\.gate\.weight", r"layers.\1.mlp.router.weight"),
    (r"model\.layers\.(\d+)\.mlp\.expert_bias", r"layers.\1.mlp.router.e_score_correction_bias"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
])


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours; the zero-element shared-expert matrices a config with
    num_shared_experts 0 stores are dropped."""
    if ".shared_experts." in name and tensor.numel() == 0:
        return []
    return _rename(name, tensor)
