"""gpt-oss (openai/gpt-oss-20b, gpt-oss-120b).

Differences from Mixtral:
- attention sinks: a learned logit per head joins every query's softmax (and takes part
  of the probability mass without adding a value);
- q/k/v and o projections carry biases (`attention_bias`);
- layers alternate between a sliding window and full attention (`layer_types`);
- YaRN RoPE by default (factor 32 over a 4096-token original context, theta 150000);
- the router is a biased linear gate; top-k of the logits then a softmax over those k,
  which is our softmax, top-k, renormalise;
- experts carry biases and use a clamped SwiGLU ((up + 1) * gate * sigmoid(1.702 gate),
  gate clamped above at 7, up to [-7, 7]); transformers stores them fused as
  gate_up_proj (E, H, 2I) with gate and up in alternating columns and down_proj (E, I, H),
  i.e. transposed relative to our (out, in) matrices;
- released checkpoints store the expert matrices in MXFP4 (`*_blocks` + `*_scales`, rows
  of 32-element blocks along the input dimension): they are passed through as codes.

`hidden_act` is not used by transformers' gpt-oss (its experts always use the clamped
SwiGLU), so it is ignored here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, DecoderLayer, Transformer, make_sanitizer, short_repr
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router

# GptOssConfig's defaults when a config.json has no rope parameters at all.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
DEFAULT_THETA = 150000.0
# The clamped SwiGLU experts.glu("swiglu_clamped") implements.
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 2880
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    head_dim: int | None = 64
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    attention_bias: bool = True
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT
    quantization_config: dict | None = None

    ALIASES = {"num_local_experts": "num_experts"}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """As the base, with GptOssConfig's rope defaults: YaRN when the config has no
        rope keys, theta 150000 when nothing names it."""
        blocks = [config[k] for k in ("rope_parameters", "rope_scaling") if k in config]
        if not blocks:
            config = {**config, "rope_parameters": dict(DEFAULT_ROPE)}
        if "rope_theta" not in config and not any(isinstance(b, dict) and "rope_theta" in b for b in blocks):
            config = {**config, "rope_theta": DEFAULT_THETA}
        return super().from_dict(config, source)

    def __post_init__(self):
        if self.layer_types is None:  # GptOssConfig's rule: even layers slide
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]

    def validate(self, source: str) -> None:
        super().validate(source)
        for name, want in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
            if getattr(self, name) != want:
                raise ModelLoadError(f"{source}: {name} {getattr(self, name)} is not supported (only {want})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"{source}: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(unknown)}")
        q = self.quantization_config
        if q is not None and q.get("quant_method") != "mxfp4":
            raise ModelLoadError(f"{source}: quantization_config.quant_method {short_repr(q.get('quant_method'))} "
                                 "is not supported (only mxfp4)")

    def window(self, layer: int) -> int | None:
        """Sliding window of one layer, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def experts_per_layer(self) -> int:
        return self.num_local_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def expert_dim(self) -> int:
        return self.intermediate_size

    @property
    def expert_act(self) -> str:
        return "swiglu_clamped"

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    layers = []
    for i in range(args.num_hidden_layers):
        spec = AttentionSpec(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            sliding_window=args.window(i),
            scale=args.head_dim**-0.5,
            sinks=True,
        )
        router = Router(args.hidden_size, args.num_local_experts, args.num_experts_per_tok, norm_topk=True, bias=True)
        layers.append(DecoderLayer(Attention(spec, rope), MoEBlock(i, router), args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


_sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.self_attn\.sinks", r"layers.\1.attn.sinks"),
        (r"model\.layers\.(\d+)\.mlp\.router\.(weight|bias)", r"layers.\1.mlp.router.\2"),
    ]
)

_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
# Dimensions of each fused tensor on disk (the expert axis first).
_DIMS = {"": 3, "_bias": 2, "_blocks": 4, "_scales": 3}


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours; fused expert tensors become per-expert parts."""
    m = _EXPERTS.match(name)
    if m is None:
        return _sanitize(name, tensor)
    layer, proj, kind = int(m.group(1)), m.group(2), m.group(3) or ""
    if tensor.dim() != _DIMS[kind]:
        raise ModelLoadError(f"fused expert tensor {name!r} should be {_DIMS[kind]}-D, got shape {tuple(tensor.shape)}")
    if proj == "gate_up_proj" and tensor.shape[1 if kind else 2] % 2:
        raise ModelLoadError(f"fused expert tensor {name!r} has an odd gate/up size, shape {tuple(tensor.shape)}")
    out = []
    for e in range(tensor.shape[0]):
        t = tensor[e]
        key = f"experts.{layer}.{e}."
        if proj == "down_proj":
            out.append((key + "down" + kind, t.T if kind == "" else t))  # float (I, H) -> (H, I)
        elif kind == "":  # (H, 2I), gate and up in alternating columns -> (I, H) each
            out += [(key + "gate", t[:, 0::2].T), (key + "up", t[:, 1::2].T)]
        else:  # bias (2I,), codes (2I, G, 16), exponents (2I, G): alternating rows
            out += [(key + "gate" + kind, t[0::2]), (key + "up" + kind, t[1::2])]
    return out
