"""Gemma 4 text MoE (google/gemma-4-26B-A4B and Gemma-4-MoE-shaped models).

Released checkpoints are multimodal (model_type "gemma4", the language model in
`text_config`, weights under `model.language_model.`); the vision and audio towers are
dropped. A text-only "gemma4_text" config is read as it is. Differences from Mixtral:
- embeddings scaled by sqrt(hidden_size); logits soft-capped by `final_logit_softcapping`;
- sandwich norms, and in every layer a dense MLP (`intermediate_size`) next to the
  experts: see gemma4_blocks.Gemma4Layer; each layer's output is scaled by `layer_scalar`;
- the router sees a weightless RMS norm of the residual stream times a learned `scale`,
  and multiplies the renormalised top-k weights by a learned `per_expert_scale`; the
  experts see pre_feedforward_layernorm_2 of the residual stream; GELU (tanh) gating;
- `layer_types`: sliding-window layers and global layers, each type with its own RoPE
  (`rope_parameters` per type: "default", or "proportional" with partial_rotary_factor)
  and head shape (global layers: `per_layer_config`, or global_head_dim and, with
  `attention_k_eq_v`, num_global_key_value_heads); with attention_k_eq_v the global
  layers have no v projection (values are the key projection's output);
- per-head q/k RMSNorm, a weightless value norm, unscaled q.k.
Per-layer embeddings (hidden_size_per_layer_input), KV sharing between layers
(num_kv_shared_layers) and bidirectional attention ("all") are refused at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import AttentionSpec
from .base import MLP, BaseModelArgs, Transformer, _split_fused, check_value, make_sanitizer, short_repr
from .gemma4_blocks import Gemma4Attention, Gemma4Layer, Gemma4MoE, Gemma4Router, GemmaNorm, ProportionalRoPE
from .rope import RoPE

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' rope for each layer type when the config gives none.
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


@dataclass
class ModelArgs(BaseModelArgs):
    """Gemma 4's text config (defaults are Gemma4TextConfig's). Build it with from_dict:
    that also sets `rope_types` and, through validate, `shapes` ((head_dim, kv_heads)
    of every layer), which build needs."""

    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    intermediate_size: int = 9216  # the dense MLP next to the experts
    moe_intermediate_size: int | None = None  # one routed expert
    num_experts: int | None = None
    top_k_experts: int | None = None
    enable_moe_block: bool = False
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    attention_k_eq_v: bool = False
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    hidden_size_per_layer_input: int | None = 256
    num_kv_shared_layers: int = 0
    use_bidirectional_attention: str | None = None
    rope_types: dict | None = None  # layer type -> checked rope parameters (set by from_dict)

    ZERO_OK = BaseModelArgs.ZERO_OK | {"hidden_size_per_layer_input", "num_kv_shared_layers"}
    ALIASES = {"hidden_act": "hidden_activation"}
    LIMITS = {**BaseModelArgs.LIMITS, "moe_intermediate_size": 1 << 20, "global_head_dim": 4096,
              "num_global_key_value_heads": 4096}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Read the text part of a gemma4 (multimodal) or gemma4_text config."""
        text = config
        if config.get("model_type") == "gemma4":
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ModelLoadError(f"{source}: text_config must be an object, got {short_repr(text)}")
            # The top-level flag decides whether the multimodal model ties its head.
            text = {**text, "model_type": "gemma4", "tie_word_embeddings": config.get("tie_word_embeddings", True)}
            source = f"{source}: text_config"
        rope = text.get("rope_parameters")
        text = {k: v for k, v in text.items() if k not in ("rope_parameters", "rope_scaling", "rope_types")}
        args = super().from_dict(text, source)
        args.rope_types = _rope_types(rope, args.layer_types, source)
        return args

    def __post_init__(self):
        if self.layer_types is None:  # transformers' default: five sliding layers, then a global one
            self.layer_types = [LAYER_TYPES[(i + 1) % 6 == 0] for i in range(self.num_hidden_layers)]
        if self.layer_types:  # transformers forces the last layer global
            self.layer_types = [*self.layer_types[:-1], "full_attention"]

    def validate(self, source: str) -> None:
        refused = [
            (not self.enable_moe_block, "enable_moe_block is false (a dense Gemma 4 has no experts to offload)"),
            (bool(self.hidden_size_per_layer_input), f"hidden_size_per_layer_input {self.hidden_size_per_layer_input}"
             " (per-layer embeddings) is not supported; only 0 or null"),
            (self.num_kv_shared_layers != 0, f"num_kv_shared_layers {self.num_kv_shared_layers} (KV sharing between "
             "layers) is not supported; only 0"),
            (self.use_bidirectional_attention not in (None, "vision"),
             f"use_bidirectional_attention {self.use_bidirectional_attention!r} is not supported (only null or "
             "'vision', which is causal for text)"),
        ]
        for bad, message in refused:
            if bad:
                raise ModelLoadError(f"{source}: {message}")
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if getattr(self, name) is None:
                raise ModelLoadError(f"{source}: {name} is required when enable_moe_block is true")
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ModelLoadError(f"{source}: top_k_experts ({self.top_k_experts}) must be between 1 and "
                                 f"num_experts ({self.num_experts})")
        super().validate(source)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(unknown)}")
        self.shapes = _layer_shapes(self, source)

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return self.top_k_experts

    @property
    def expert_dim(self) -> int:
        return self.moe_intermediate_size

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers)) if self.enable_moe_block and self.num_experts else []


def _layer_shapes(args: ModelArgs, source: str) -> list[tuple[int, int]]:
    """(head_dim, kv_heads) of every layer, as transformers' per_layer_config resolves them."""
    base = (args.head_dim, args.num_key_value_heads)
    if args.per_layer_config is None:  # transformers builds per_layer_config from these two keys
        kv = args.num_global_key_value_heads if args.attention_k_eq_v and args.num_global_key_value_heads else base[1]
        shapes = [(args.global_head_dim, kv) if t == "full_attention" else base for t in args.layer_types]
    else:
        shapes = [base] * args.num_hidden_layers
        for key, over in args.per_layer_config.items():
            where = f"per_layer_config.{key}"
            if not (str(key).isdigit() and int(key) < args.num_hidden_layers) or not isinstance(over, dict):
                raise ModelLoadError(f"{source}: {where} must be a layer index below {args.num_hidden_layers} "
                                     f"mapped to an object, got {short_repr(over)}")
            extra = sorted(set(over) - {"head_dim", "num_key_value_heads"})
            if extra:
                raise ModelLoadError(f"{source}: {where} overrides {', '.join(extra)}; only head_dim and "
                                     "num_key_value_heads are supported")
            shapes[int(key)] = tuple(check_value(f"{where}.{name}", over.get(name, dflt), int, False, source, 4096)
                                     for name, dflt in zip(("head_dim", "num_key_value_heads"), base))
    for t in LAYER_TYPES:
        dims = {d for (d, _), lt in zip(shapes, args.layer_types) if lt == t}
        if len(dims) > 1:
            raise ModelLoadError(f"{source}: {t} layers have different head_dim values {sorted(dims)}; one RoPE per "
                                 "layer type needs one")
    for i, (d, kv) in enumerate(shapes):
        if d % 2 or args.num_attention_heads % kv:
            raise ModelLoadError(f"{source}: layer {i} has head_dim {d} (must be even) and {kv} key/value heads "
                                 f"(must divide num_attention_heads {args.num_attention_heads})")
    return shapes


def _rope_types(rope, layer_types: list[str], source: str) -> dict[str, dict]:
    """Checked rope parameters for each layer type used (transformers' defaults if absent)."""
    if rope is None:
        rope = DEFAULT_ROPE
    used = sorted(set(layer_types))
    if not isinstance(rope, dict) or not all(isinstance(rope.get(t), dict) for t in used):
        raise ModelLoadError(f"{source}: rope_parameters must map each layer type ({', '.join(used)}) to an object, "
                             f"got {short_repr(rope)}")
    out = {}
    for t in used:
        p, where = rope[t], f"rope_parameters.{t}"
        kind = p.get("rope_type", "default")
        if kind not in ("default", "proportional"):
            raise ModelLoadError(f"{source}: {where}.rope_type {short_repr(kind)} is not supported "
                                 "(supported: default, proportional)")
        theta = check_value(f"{where}.rope_theta", p.get("rope_theta", 10000.0), float, False, source)
        fraction = check_value(f"{where}.partial_rotary_factor", p.get("partial_rotary_factor", 1.0), float, False,
                               source, 1.0)
        factor = check_value(f"{where}.factor", p.get("factor", 1.0), float, False, source)
        if theta <= 1:
            raise ModelLoadError(f"{source}: {where}.rope_theta must be greater than 1, got {theta!r}")
        out[t] = {"rope_type": kind, "rope_theta": theta, "partial_rotary_factor": fraction, "factor": factor}
    return out


def _rope(p: dict, head_dim: int) -> RoPE:
    if p["rope_type"] == "proportional":
        return ProportionalRoPE(head_dim, p["rope_theta"], p["partial_rotary_factor"], p["factor"])
    return RoPE(head_dim, p["rope_theta"], None)  # Gemma 4's default rope ignores partial_rotary_factor


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    H, eps = args.hidden_size, args.rms_norm_eps
    dims = {t: d for (d, _), t in zip(args.shapes, args.layer_types)}
    ropes = {t: _rope(args.rope_types[t], dims[t]) for t in dims}
    layers = []
    for i, (t, (head_dim, kv_heads)) in enumerate(zip(args.layer_types, args.shapes)):
        sliding = t == "sliding_attention"
        spec = AttentionSpec(
            hidden=H, heads=args.num_attention_heads, kv_heads=kv_heads, head_dim=head_dim,
            qkv_bias=args.attention_bias, o_bias=args.attention_bias, qk_norm="head", norm_eps=eps,
            sliding_window=args.sliding_window if sliding else None, scale=1.0,
        )
        attn = Gemma4Attention(spec, ropes[t], k_eq_v=args.attention_k_eq_v and not sliding)
        moe = Gemma4MoE(i, Gemma4Router(H, args.num_experts, args.top_k_experts, eps), H, eps)
        layers.append(Gemma4Layer(attn, MLP(H, args.intermediate_size, args.hidden_act), moe, H, eps))
    model = Transformer(args, layers)
    model.norm = GemmaNorm(H, eps)
    model.embed_scale = H**0.5
    model.logits_softcap = args.final_logit_softcapping
    return model


_rename = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.post_attn_norm.weight"),
        (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
        (r"model\.layers\.(\d+)\.pre_feedforward_layernorm_2\.weight", r"layers.\1.mlp.norm.weight"),
        (r"model\.layers\.(\d+)\.post_feedforward_layernorm_1\.weight", r"layers.\1.post_dense_norm.weight"),
        (r"model\.layers\.(\d+)\.post_feedforward_layernorm_2\.weight", r"layers.\1.post_moe_norm.weight"),
        (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", r"layers.\1.post_mlp_norm.weight"),
        (r"model\.layers\.(\d+)\.layer_scalar", r"layers.\1.layer_scalar"),
        (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.dense.\2.weight"),
        (r"model\.layers\.(\d+)\.router\.proj\.weight", r"layers.\1.mlp.router.weight"),
        (r"model\.layers\.(\d+)\.router\.(scale|per_expert_scale)", r"layers.\1.mlp.router.\2"),
    ]
)
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.experts\.(gate_up_proj|down_proj)$")
_TOWERS = re.compile(r"model\.(vision_tower|embed_vision|audio_tower|embed_audio)\.")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours: the multimodal language model's prefix is dropped,
    the vision and audio towers are skipped, fused experts are split per expert."""
    if _TOWERS.match(name):
        return []
    name = re.sub(r"^model\.language_model\.", "model.", name)
    experts = _EXPERTS.match(name)
    if experts:
        return _split_fused(int(experts.group(1)), experts.group(2), name, tensor)
    return _rename(name, tensor)
