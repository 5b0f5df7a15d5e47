"""Phi-3.5-MoE (microsoft/Phi-3.5-MoE-instruct and Phi-MoE-shaped models), as
transformers' Phimoe runs them.

Differences from Mixtral:
- SparseMixer routing (routers.SparseMixerRouter, inference form): always two experts,
  each weighted by a softmax over the logits within a relative 2 * router_jitter_noise
  of it; the weights are not renormalised;
- LayerNorm with weight and bias (eps `rms_norm_eps`) for the block norms and the final
  norm; `attention_bias` puts a bias on q/k/v/o, `lm_head_bias` on the LM head;
- LongRoPE ("longrope"): transformers' Phimoe rotates with the `short_factor`
  frequencies at every length and switches only the cos/sin scale, to `long_mscale`
  when a forward reaches past original_max_position_embeddings (`short_mscale`
  otherwise); `long_factor` is checked but, as there, never used. See rope.LongRoPE for
  how the switch interacts with the KV cache;
- an optional sliding window on every layer; rope theta defaults to 1e6.

`input_jitter_noise` only applies in training and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, DecoderLayer, Transformer, check_value, make_sanitizer, short_repr
from .moe import MoEBlock
from .norms import LayerNorm
from .rope import LongRoPE, RoPE
from .routers import SparseMixerRouter

DEFAULT_THETA = 1000000.0  # PhimoeConfig.default_theta, used when the config names none


@dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are PhimoeConfig's, for config keys a checkpoint may leave out.
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    intermediate_size: int = 6400  # one routed expert
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    input_jitter_noise: float = 0.0
    attention_bias: bool = False
    lm_head_bias: bool = False
    sliding_window: int | None = None

    ZERO_OK = BaseModelArgs.ZERO_OK | {"router_jitter_noise", "input_jitter_noise"}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        config, longrope = _split_longrope(config, source)
        args = super().from_dict(config, source)
        if longrope is not None:
            for name in ("short_factor", "long_factor"):
                if len(longrope[name]) != args.head_dim // 2:
                    raise ModelLoadError(f"{source}: rope {name} has {len(longrope[name])} entries, expected "
                                         f"head_dim / 2 = {args.head_dim // 2}")
            args.rope_scaling = longrope
        return args

    def validate(self, source: str) -> None:
        if self.num_experts_per_tok != 2:
            raise ModelLoadError(f"{source}: num_experts_per_tok {self.num_experts_per_tok} is not supported "
                                 "(SparseMixer routing always picks 2 experts)")
        super().validate(source)
        if self.lm_head_bias and self.tie_word_embeddings:
            raise ModelLoadError(f"{source}: lm_head_bias with tie_word_embeddings is not supported")

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


def _split_longrope(config: dict, source: str) -> tuple[dict, dict | None]:
    """Read Phimoe's rope block: returns the config with it reduced to its theta, and the
    checked longrope parameters (None for plain RoPE). Other rope types are refused:
    Phimoe applies its short/long mscales to them, which the shared tables do not."""
    params: dict = {}
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins, as in the shared reader
        block = config.get(key)
        if block is not None and not isinstance(block, dict):
            raise ModelLoadError(f"{source}: {key} must be an object or null, got {short_repr(block)}")
        params.update(block or {})
    out = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")}
    out["rope_theta"] = params.get("rope_theta", config.get("rope_theta", DEFAULT_THETA))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return out, None
    if kind != "longrope":
        raise ModelLoadError(f"{source}: rope type {kind!r} is not supported for phimoe (supported: default, longrope)")
    rope = {"rope_type": "longrope"}
    for name, tp in (("short_factor", list[float]), ("long_factor", list[float]), ("short_mscale", float),
                     ("long_mscale", float)):
        if name not in params:
            raise ModelLoadError(f"{source}: longrope needs rope {name}")
        rope[name] = check_value(f"rope {name}", params[name], tp, False, source)
    # As transformers: a top-level original_max_position_embeddings wins over the block's.
    orig = config.get("original_max_position_embeddings",
                      params.get("original_max_position_embeddings", config.get("max_position_embeddings", 131072)))
    rope["original_max_position_embeddings"] = check_value("original_max_position_embeddings", orig, int, False,
                                                           source)
    return out, rope


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    r = args.rope_scaling
    if r is None:
        rope = RoPE(args.head_dim, args.rope_theta, None)
    else:
        # Short-factor frequencies on both sides, as transformers' Phimoe computes them.
        rope = LongRoPE(args.head_dim, args.rope_theta, short=(r["short_factor"], r["short_mscale"]),
                        long=(r["short_factor"], r["long_mscale"]), original_max=r["original_max_position_embeddings"])
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        sliding_window=args.sliding_window,
    )
    H, eps = args.hidden_size, args.rms_norm_eps
    layers = []
    for i in range(args.num_hidden_layers):
        router = SparseMixerRouter(H, args.num_local_experts, args.router_jitter_noise)
        layer = DecoderLayer(Attention(spec, rope), MoEBlock(i, router), H, eps)
        layer.norm1, layer.norm2 = LayerNorm(H, eps), LayerNorm(H, eps)
        layers.append(layer)
    model = Transformer(args, layers, lm_head_bias=args.lm_head_bias)
    model.norm = LayerNorm(H, eps)
    return model


# Phi-3.5-MoE's names on disk (w1 = gate, w3 = up, w2 = down; the router is `gate`) and
# transformers 5's in memory (mlp.router); the rest are common.
sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.(?:block_sparse_moe\.gate|mlp\.router)\.weight", r"layers.\1.mlp.router.weight"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"experts.\1.\2.gate"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"experts.\1.\2.up"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"experts.\1.\2.down"),
        (r"model\.layers\.(\d+)\.input_layernorm\.bias", r"layers.\1.norm1.bias"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.bias", r"layers.\1.norm2.bias"),
        (r"model\.norm\.bias", "norm.bias"),
        (r"lm_head\.bias", "lm_head.bias"),
    ]
)
