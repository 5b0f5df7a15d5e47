"""Granite MoE (ibm-granite/granite-3.0-1b-a400m, granite-3.1-3b-a800m and
GraniteMoE-shaped models).

Differences from Mixtral:
- four multipliers: embeddings are scaled by `embedding_multiplier`, every branch output
  by `residual_multiplier` before its residual add, q.k by `attention_multiplier`
  (instead of 1/sqrt(head_dim)), and the logits are divided by `logits_scaling`;
- the router takes the top k logits and a softmax over those k, which equals softmax,
  top-k, renormalise (`Router(norm_topk=True)`);
- the experts are stored fused: `input_linear` (E, 2I, H) holds gate then up,
  `output_linear` (E, H, I) the down projections; the router is `router.layer`;
- `attention_bias` puts a bias on all four attention projections;
- every layer is MoE; no q/k norms, no sliding window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import BaseModelArgs, ScaledDecoderLayer, Transformer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 11008  # one routed expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    attention_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    max_position_embeddings: int = 2048

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


def build_layers(args: ModelArgs, shared=None) -> list[ScaledDecoderLayer]:
    """The decoder layers; `shared(i)` (GraniteMoeShared) gives layer i's shared MLP."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        scale=args.attention_multiplier,
    )
    return [
        ScaledDecoderLayer(
            Attention(spec, rope),
            MoEBlock(
                i,
                Router(args.hidden_size, args.num_local_experts, args.num_experts_per_tok, norm_topk=True),
                shared=shared(i) if shared is not None else None,
            ),
            args.hidden_size,
            args.rms_norm_eps,
            args.residual_multiplier,
        )
        for i in range(args.num_hidden_layers)
    ]


def finish(args: ModelArgs, layers: list[ScaledDecoderLayer]) -> Transformer:
    """The decoder stack with Granite's embedding and logits multipliers."""
    model = Transformer(args, layers)
    model.embed_scale = args.embedding_multiplier
    model.logits_scale = 1.0 / args.logits_scaling  # transformers divides by logits_scaling
    return model


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    return finish(args, build_layers(args))


_rename = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.block_sparse_moe\.router\.(?:layer\.)?weight", r"layers.\1.mlp.router.weight"),
    ]
)

# On disk: input_linear (E, 2I, H) = gate rows then up rows per expert, output_linear (E, H, I).
_FUSED = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(input|output)_linear\.weight$")


def split_experts(layer: int, kind: str, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One fused expert tensor -> experts.<layer>.<e>.<gate|up|down> per expert."""
    if t.dim() != 3 or (kind == "input" and t.shape[1] % 2):
        raise ModelLoadError(f"fused expert tensor {name!r} should be 3-D (input_linear with an even middle "
                             f"dimension), got shape {tuple(t.shape)}")
    out = []
    for e in range(t.shape[0]):
        if kind == "input":
            gate, up = t[e].chunk(2, dim=0)  # (I, H) x2
            out += [(f"experts.{layer}.{e}.gate", gate), (f"experts.{layer}.{e}.up", up)]
        else:
            out.append((f"experts.{layer}.{e}.down", t[e]))  # (H, I)
    return out


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours, splitting the fused expert tensors per expert."""
    fused = _FUSED.match(name)
    if fused:
        return split_experts(int(fused.group(1)), fused.group(2), name, tensor)
    return _rename(name, tensor)
