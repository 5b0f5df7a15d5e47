"""DBRX (databricks/dbrx-base, dbrx-instruct and DBRX-shaped models).

Differences from Mixtral:
- config.json nests its options: `attn_config` (kv_n_heads, clip_qkv, rope_theta) and
  `ffn_config` (ffn_hidden_size, moe_num_experts, moe_top_k, moe_normalize_expert_weights,
  ffn_act_fn); the top level names d_model, n_heads, n_layers and max_seq_len;
- one fused `Wqkv` projection (rows [q | k | v]) whose output is clamped to
  [-clip_qkv, clip_qkv]; no biases anywhere;
- LayerNorms with a weight and no bias (eps 1e-5) instead of RMSNorms;
- routing: softmax over all experts, top k, then the k weights divided by their p-norm
  with p = moe_normalize_expert_weights (1: the usual renormalisation; null: none);
- the experts of a layer are stored as three 2-D tensors w1, v1, w2 of shape (E*I, H):
  expert e's gate, up and (transposed) down projections are rows e*I..(e+1)*I;
- every layer is MoE; the LM head is never tied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from ..experts import ACTIVATIONS
from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, DecoderLayer, Transformer, check_value, make_sanitizer, short_repr
from .moe import MoEBlock
from .norms import LayerNormNoBias
from .rope import RoPE
from .routers import Router

LN_EPS = 1e-5  # torch's nn.LayerNorm default, which DBRX's norms use


@dataclass
class ModelArgs(BaseModelArgs):
    num_key_value_heads: int | None = 1
    max_position_embeddings: int = 2048
    clip_qkv: float | None = None
    ffn_hidden_size: int = 3584  # one routed expert
    moe_num_experts: int = 4
    moe_top_k: int = 1
    moe_normalize_expert_weights: float | None = 1.0
    ffn_act_fn: dict | None = None

    # Our field -> DBRX's key; nested keys are read as "<block>.<key>".
    ALIASES = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
        "num_key_value_heads": "attn_config.kv_n_heads",
        "clip_qkv": "attn_config.clip_qkv",
        "ffn_hidden_size": "ffn_config.ffn_hidden_size",
        "moe_num_experts": "ffn_config.moe_num_experts",
        "moe_top_k": "ffn_config.moe_top_k",
        "moe_normalize_expert_weights": "ffn_config.moe_normalize_expert_weights",
        "ffn_act_fn": "ffn_config.ffn_act_fn",
    }
    LIMITS = {**BaseModelArgs.LIMITS, "moe_num_experts": 4096, "ffn_hidden_size": 1 << 20}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Flatten attn_config / ffn_config into "<block>.<key>" entries and read them
        through ALIASES, so that every error names the nested key. transformers' own
        top-level copies (num_key_value_heads, hidden_size, head_dim) are ignored: it
        derives them from the nested values and d_model / n_heads."""
        flat = {k: v for k, v in config.items() if k not in cls.ALIASES and k != "head_dim"}
        for block in ("attn_config", "ffn_config"):
            sub = config.get(block) or {}
            if not isinstance(sub, dict):
                raise ModelLoadError(f"{source}: {block} must be an object, got {short_repr(sub)}")
            flat.update({f"{block}.{k}": v for k, v in sub.items()})
        # Older configs keep the rope base in attn_config; transformers 5 writes a top-level
        # rope_parameters (its default 10000 when it did not carry the nested one over).
        nested = flat.get("attn_config.rope_theta")
        if nested is not None:
            nested = check_value("attn_config.rope_theta", nested, float, False, source)
            if not any(k in config for k in ("rope_parameters", "rope_scaling", "rope_theta")):
                flat["rope_theta"] = nested
        args = super().from_dict(flat, source)
        if nested is not None and nested != args.rope_theta:
            raise ModelLoadError(f"{source}: attn_config.rope_theta ({nested:g}) disagrees with the top-level rope "
                                 f"theta ({args.rope_theta:g}); set both to the value the model was trained with")
        return args

    def validate(self, source: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ModelLoadError(f"{source}: d_model ({self.hidden_size}) is not a multiple of n_heads "
                                 f"({self.num_attention_heads})")
        act = self.ffn_act_fn if self.ffn_act_fn is not None else {"name": "silu"}
        if set(act) != {"name"} or act["name"] not in ACTIVATIONS:
            raise ModelLoadError(f"{source}: ffn_config.ffn_act_fn {short_repr(act)} is not supported (supported: "
                                 f"{{\"name\": one of {', '.join(sorted(ACTIVATIONS))}}}, no other arguments)")
        self.hidden_act = act["name"]
        if self.tie_word_embeddings:
            raise ModelLoadError(f"{source}: tie_word_embeddings is not supported for DBRX (its LM head is separate)")
        super().validate(source)

    @property
    def experts_per_layer(self) -> int:
        return self.moe_num_experts

    @property
    def top_k(self) -> int:
        return self.moe_top_k

    @property
    def expert_dim(self) -> int:
        return self.ffn_hidden_size

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))


class PNormRouter(Router):
    """Softmax over all experts, top k, then the k weights divided by their p-norm
    (sum |w|^p)^(1/p) (DBRX's moe_normalize_expert_weights, p other than 1)."""

    kind = "softmax-pnorm"
    supports_adaptive = False  # the p-norm is not a share of probability mass

    def __init__(self, hidden: int, num_experts: int, top_k: int, p: float):
        super().__init__(hidden, num_experts, top_k, norm_topk=False)
        self.p = p

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(x)  # (N, E)
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)  # (N, k) x2
        weights = weights / torch.linalg.vector_norm(weights, ord=self.p, dim=-1, keepdim=True)
        return weights.to(x.dtype), ids, logits


def make_router(args: ModelArgs) -> Router:
    p = args.moe_normalize_expert_weights
    if p is None or p == 1.0:  # none, or division by the sum: the plain softmax router
        return Router(args.hidden_size, args.moe_num_experts, args.moe_top_k, norm_topk=p is not None)
    return PNormRouter(args.hidden_size, args.moe_num_experts, args.moe_top_k, p)


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(hidden=args.hidden_size, heads=args.num_attention_heads, kv_heads=args.num_key_value_heads,
                         head_dim=args.head_dim, clip_qkv=args.clip_qkv, fused_qkv=True)
    layers = []
    for i in range(args.num_hidden_layers):
        layer = DecoderLayer(Attention(spec, rope), MoEBlock(i, make_router(args)), args.hidden_size, LN_EPS)
        layer.norm1, layer.norm2 = LayerNormNoBias(args.hidden_size, LN_EPS), LayerNormNoBias(args.hidden_size, LN_EPS)
        layers.append(layer)
    model = Transformer(args, layers)
    model.norm = LayerNormNoBias(args.hidden_size, LN_EPS)
    return model


_rename = make_sanitizer([
    (r"transformer\.wte\.weight", "embed.weight"),
    (r"transformer\.norm_f\.weight", "norm.weight"),
    (r"transformer\.blocks\.(\d+)\.norm_attn_norm\.norm_([12])\.weight", r"layers.\1.norm\2.weight"),
    (r"transformer\.blocks\.(\d+)\.norm_attn_norm\.attn\.Wqkv\.weight", r"layers.\1.attn.qkv.weight"),
    (r"transformer\.blocks\.(\d+)\.norm_attn_norm\.attn\.out_proj\.weight", r"layers.\1.attn.o.weight"),
    (r"transformer\.blocks\.(\d+)\.ffn\.router\.layer\.weight", r"layers.\1.mlp.router.weight"),
])

_EXPERTS = re.compile(r"transformer\.blocks\.(\d+)\.ffn\.experts\.mlp\.(w1|v1|w2)$")
_PART = {"w1": "gate", "v1": "up", "w2": "down"}


def split_experts(layer: int, kind: str, name: str, t: torch.Tensor, args: "ModelArgs") -> list[tuple[str, torch.Tensor]]:
    """One (E*I, H) expert tensor -> experts.<layer>.<e>.<part> per expert; w2 holds each
    expert's down projection transposed, (I, H)."""
    E = args.moe_num_experts
    if tuple(t.shape) != (E * args.ffn_hidden_size, args.hidden_size):
        raise ModelLoadError(f"fused expert tensor {name!r} has shape {tuple(t.shape)}; expected "
                             f"(moe_num_experts * ffn_hidden_size, d_model) = "
                             f"({E * args.ffn_hidden_size}, {args.hidden_size})")
    per = t.view(E, t.shape[0] // E, t.shape[1])  # (E, I, H)
    part = _PART[kind]
    return [(f"experts.{layer}.{e}.{part}", per[e].t().contiguous() if kind == "w2" else per[e]) for e in range(E)]


def sanitize(name: str, tensor: torch.Tensor, args: "ModelArgs") -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours, splitting the fused expert tensors per expert (their
    layout depends on the config: see models.sanitizer)."""
    m = _EXPERTS.match(name)
    if m:
        return split_experts(int(m.group(1)), m.group(2), name, tensor, args)
    return _rename(name, tensor)
