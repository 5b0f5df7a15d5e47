"""EXAONE-MoE (LGAI-EXAONE/K-EXAONE-236B-A23B and EXAONE-MoE-shaped models).

Differences from Mixtral:
- the DeepSeek-V3 router: sigmoid scores, an `e_score_correction_bias` used only to choose,
  group-limited choice (n_group/topk_group, groups scored by their best two, the others
  never chosen), renormalisation with `norm_topk_prob`, times `routed_scaling_factor`;
- a shared expert of width moe_intermediate_size * num_shared_experts on every MoE layer;
- dense MLP layers (width `intermediate_size`) where `mlp_layer_types` says "dense"
  (default: the first `first_k_dense_replace` layers);
- per-head RMSNorm on q and k;
- hybrid attention by `layer_types` (default: every `sliding_window_pattern`-th layer
  global, the others sliding); only the sliding layers use RoPE, the global ones have no
  position encoding (NoPE);
- multi-token-prediction weights (`mtp.*`) are not used and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, make_sanitizer
from .moe import MoEBlock
from .rope import RoPE
from .routers import GroupedRouter, check_groups


@dataclass
class ModelArgs(BaseModelArgs):
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 2048
    intermediate_size: int = 16384  # dense layers
    moe_intermediate_size: int = 1024  # one routed expert
    num_experts: int = 64
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    mlp_layer_types: list[str] | None = None
    sliding_window: int = 4096  # transformers' config refuses null
    sliding_window_pattern: int | str | None = 4
    layer_types: list[str] | None = None
    rms_norm_eps: float = 1e-5

    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_shared_experts", "first_k_dense_replace", "sliding_window_pattern"}
    LIMITS = {**BaseModelArgs.LIMITS, "num_shared_experts": 4096, "n_group": 4096, "topk_group": 4096}

    def validate(self, source: str) -> None:
        L = self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense" if i < self.first_k_dense_replace else "sparse" for i in range(L)]
        if self.layer_types is None:
            # transformers' rule (ExaoneMoeConfig.__post_init__): every pattern-th layer is global.
            pattern = self.sliding_window_pattern
            if not isinstance(pattern, int) or pattern < 1:
                raise ModelLoadError(f"{source}: sliding_window_pattern {pattern!r} is not supported without "
                                     "layer_types (expected a positive integer)")
            self.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
        for key, allowed in (("mlp_layer_types", {"dense", "sparse"}),
                             ("layer_types", {"full_attention", "sliding_attention"})):
            values = getattr(self, key)
            if len(values) != L:
                raise ModelLoadError(f"{source}: {key} has {len(values)} entries for {L} layers")
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ModelLoadError(f"{source}: unsupported {key} entries: {', '.join(unknown)}")
        super().validate(source)
        if self.moe_layers():
            check_groups(self.num_experts, self.n_group, self.topk_group, self.num_experts_per_tok, source)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

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
        return [i for i, kind in enumerate(self.mlp_layer_types) if kind == "sparse"]


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    moe = set(args.moe_layers())
    shared = args.moe_intermediate_size * args.num_shared_experts
    layers = []
    for i in range(args.num_hidden_layers):
        window = args.window(i)
        spec = AttentionSpec(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=window,
            use_rope=window is not None,  # global layers have no position encoding
        )
        if i in moe:
            router = GroupedRouter(
                args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob,
                scoring="sigmoid", correction=True, n_group=args.n_group, topk_group=args.topk_group,
                group_score="top2", scaling=args.routed_scaling_factor, masked_score=float("-inf"), float_logits=True,
            )
            mlp = MoEBlock(i, router, shared=MLP(args.hidden_size, shared, args.hidden_act) if shared else None)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(Attention(spec, rope), mlp, args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


_rename = make_sanitizer([
    # On disk the bias sits on the MoE block; transformers moves it into the gate.
    (r"model\.layers\.(\d+)\.mlp\.(?:gate\.)?e_score_correction_bias", r"layers.\1.mlp.router.e_score_correction_bias"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
])


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours. Multi-token-prediction weights are dropped (as
    transformers does), and so are the zero-element shared-expert matrices a config with
    num_shared_experts 0 stores."""
    if name.startswith("mtp.") or (".shared_experts." in name and tensor.numel() == 0):
        return []
    return _rename(name, tensor)
