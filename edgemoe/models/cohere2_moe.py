"""Cohere2-MoE (CohereLabs Command A MoE models and Cohere2-MoE-shaped models).

Differences from Mixtral:
- parallel blocks: attention and MLP read the same normed input and both add to the
  residual, x + attn(norm(x)) + mlp(norm(x)); one norm per layer, a bias-free LayerNorm
  (layer_norm_eps) or, when rms_norm_eps is set, an RMSNorm;
- hybrid attention by `layer_types` (default: every `sliding_window_pattern`-th layer
  global, the others sliding); RoPE, on interleaved channel pairs, only on the sliding
  layers and on the dense prefix layers when prefix_dense_sliding_window_pattern is 1;
- `mlp_layer_types` says which layers are dense ("dense", width
  prefix_dense_intermediate_size) and which MoE ("sparse"); configs may give
  `first_k_dense_replace` instead (dense prefix, its own window pattern);
- routing picks the top k logits, then a softmax over them (`expert_selection_fn`
  "softmax") or their sigmoids, renormalised with norm_topk_prob ("sigmoid");
- num_shared_experts shared experts form one MLP of width intermediate_size x that
  number, added to the routed sum ("sum") or averaged with it ("average");
- biases on all four attention projections with `attention_bias`; logits are multiplied
  by `logit_scale`; embeddings tied by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec, KVCache
from .base import MLP, BaseModelArgs, Transformer, make_sanitizer
from .moe import MoEBlock
from .norms import LayerNormNoBias, RMSNorm
from .rope import RoPE
from .routers import GroupedRouter, Router

LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_TYPES = ("dense", "sparse")


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 22528  # one routed expert (and the unit of the shared MLP)
    prefix_dense_intermediate_size: int | None = None  # dense layers; None: intermediate_size
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    shared_expert_combination_strategy: str = "average"
    expert_selection_fn: str = "softmax"
    norm_topk_prob: bool = True
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    first_k_dense_replace: int = 0  # read only to derive layer_types / mlp_layer_types
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 4
    prefix_dense_sliding_window_pattern: int = 1
    attention_bias: bool = False
    logit_scale: float = 0.0625
    layer_norm_eps: float = 1e-5
    rms_norm_eps: float | None = None  # set: RMSNorms instead of LayerNorms
    head_dim: int | None = 128
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True

    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_shared_experts", "first_k_dense_replace"}
    LIMITS = {**BaseModelArgs.LIMITS, "num_shared_experts": 4096, "prefix_dense_intermediate_size": 1 << 20,
              "first_k_dense_replace": 1024}

    def validate(self, source: str) -> None:
        L, k = self.num_hidden_layers, self.first_k_dense_replace
        if k > L:
            raise ModelLoadError(f"{source}: first_k_dense_replace ({k}) is more than the {L} layers")
        if self.layer_types is None:  # transformers' derivation: the prefix has its own pattern
            pre, rest = self.prefix_dense_sliding_window_pattern, self.sliding_window_pattern
            self.layer_types = [LAYER_TYPES[(i + 1) % pre != 0] for i in range(k)]
            self.layer_types += [LAYER_TYPES[(i + 1) % rest != 0] for i in range(L - k)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense" if i < k else "sparse" for i in range(L)]
        for key, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_TYPES)):
            value = getattr(self, key)
            if len(value) != L:
                raise ModelLoadError(f"{source}: {key} has {len(value)} entries for {L} layers")
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise ModelLoadError(f"{source}: unsupported {key} entries: {', '.join(unknown)} "
                                     f"(supported: {', '.join(allowed)})")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ModelLoadError(f"{source}: layer_types has sliding_attention layers but sliding_window is null")
        for key, allowed in (("expert_selection_fn", ("softmax", "sigmoid")),
                             ("shared_expert_combination_strategy", ("average", "sum"))):
            if getattr(self, key) not in allowed:
                raise ModelLoadError(f"{source}: {key} {getattr(self, key)!r} is not supported "
                                     f"(supported: {', '.join(allowed)})")
        super().validate(source)

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
        return [i for i, t in enumerate(self.mlp_layer_types) if t == "sparse"]


class ParallelDecoderLayer(nn.Module):
    """One norm, attention and MLP side by side: x + attn(norm1(x)) + mlp(norm1(x))."""

    def __init__(self, attn: Attention, mlp: nn.Module, norm: nn.Module):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.norm1 = norm

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        h = self.norm1(x)  # (B, T, H)
        return x + self.attn(h, cache) + self.mlp(h)


class AveragedMoEBlock(MoEBlock):
    """MoE block whose routed sum and shared MLP output are averaged, not added
    (shared_expert_combination_strategy "average")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 2  # (routed + shared) / 2


def make_norm(args: ModelArgs) -> nn.Module:
    if args.rms_norm_eps is not None:
        return RMSNorm(args.hidden_size, args.rms_norm_eps)
    return LayerNormNoBias(args.hidden_size, args.layer_norm_eps)


def make_router(args: ModelArgs) -> Router:
    E, k = args.num_experts, args.num_experts_per_tok
    if args.expert_selection_fn == "softmax":  # softmax over the top k logits = softmax, top k, renormalise
        return Router(args.hidden_size, E, k, norm_topk=True)
    # sigmoid is monotonic: the top k sigmoids are those of the top k logits
    return GroupedRouter(args.hidden_size, E, k, args.norm_topk_prob, scoring="sigmoid")


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling, interleaved=True)
    moe = set(args.moe_layers())
    layers = []
    for i in range(args.num_hidden_layers):
        sliding = args.layer_types[i] == "sliding_attention"
        dense = i not in moe
        spec = AttentionSpec(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            sliding_window=args.sliding_window if sliding else None,
            # Global layers have no position encoding, except a dense prefix whose window
            # pattern is 1 (all global), as transformers' force_rope.
            use_rope=sliding or (dense and args.prefix_dense_sliding_window_pattern == 1),
        )
        if dense:
            mlp = MLP(args.hidden_size, args.prefix_dense_intermediate_size or args.intermediate_size, args.hidden_act)
        else:
            n = args.num_shared_experts
            shared = MLP(args.hidden_size, args.intermediate_size * n, args.hidden_act) if n else None
            block = AveragedMoEBlock if n and args.shared_expert_combination_strategy == "average" else MoEBlock
            mlp = block(i, make_router(args), shared=shared)
        layers.append(ParallelDecoderLayer(Attention(spec, rope), mlp, make_norm(args)))
    model = Transformer(args, layers)
    model.norm = make_norm(args)
    model.logits_scale = args.logit_scale
    return model


sanitize = make_sanitizer([
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
])
