"""Hunyuan-MoE v1 (tencent/Hunyuan-A13B and Hunyuan-A13B-shaped models), as
transformers' HunYuanMoEV1 runs them.

Differences from Mixtral:
- every layer is MoE and also runs one shared MLP of width `intermediate_size` (the
  routed experts have that width too), added to the routed output without a gate;
- the router is softmax, top k, renormalised;
- per-head RMSNorm on queries and keys (`query_layernorm`, `key_layernorm`) applied
  *after* RoPE; `attention_bias` puts a bias on q/k/v/o;
- rope "dynamic" with an `alpha` is NTK-alpha scaling: a fixed alpha stretches the rope
  base to theta * alpha^(d / (d - 2)), a static table (transformers' ntk_alpha);
- `num_experts` and `moe_topk` may be per-layer lists. The runtime (expert store,
  cache, predictors) assumes one expert count and one top-k for every MoE layer, so
  lists are accepted only when all their values are equal.

Keys of the original Hunyuan configs that transformers does not implement are refused
when they ask for something else than what it runs (use_cla, use_mla, use_qk_norm
false, mlp_bias, experts of another width, a shared-expert count other than 1, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, check_value, make_sanitizer, short_repr
from .moe import MoEBlock
from .rope import RoPE
from .routers import Router


@dataclass
class ModelArgs(BaseModelArgs):
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    intermediate_size: int = 11008  # routed experts and the shared MLP
    num_experts: int | list[int] = 1
    moe_topk: int | list[int] = 1
    attention_bias: bool = False
    # Original-config keys, checked against what transformers runs (see validate).
    moe_intermediate_size: int | list[int] | None = None
    num_shared_expert: int | list[int] | None = None
    moe_layer_num_skipped: int = 0
    norm_topk_prob: bool = True
    use_qk_norm: bool = True
    use_rotary_pos_emb: bool = True
    use_cla: bool = False
    use_mla: bool = False
    mlp_bias: bool = False

    ZERO_OK = BaseModelArgs.ZERO_OK | {"moe_layer_num_skipped"}
    # transformers' attribute aliases, in case a config is written with them.
    ALIASES = {"num_experts": "num_local_experts", "moe_topk": "num_experts_per_tok"}
    LIMITS = {**BaseModelArgs.LIMITS, "moe_topk": 4096}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        config, alpha = _split_ntk_alpha(config, source)
        args = super().from_dict(config, source)
        if alpha is not None:
            if args.head_dim <= 2:
                raise ModelLoadError(f"{source}: NTK-alpha rope needs head_dim > 2, got {args.head_dim}")
            args.rope_scaling = {"rope_type": "ntk_alpha", "alpha": alpha}
        return args

    def validate(self, source: str) -> None:
        for name in ("num_experts", "moe_topk"):
            self._per_layer(name, source)
        super().validate(source)
        for name, ok in (("moe_intermediate_size", self.intermediate_size), ("num_shared_expert", 1)):
            value = getattr(self, name)
            if value is not None and any(v != ok for v in (value if isinstance(value, list) else [value])):
                raise ModelLoadError(f"{source}: {name} {short_repr(value)} is not supported (transformers' "
                                     f"Hunyuan runs {ok} for it)")
        refused = {"moe_layer_num_skipped": self.moe_layer_num_skipped != 0, "norm_topk_prob": not self.norm_topk_prob,
                   "use_qk_norm": not self.use_qk_norm, "use_rotary_pos_emb": not self.use_rotary_pos_emb,
                   "use_cla": self.use_cla, "use_mla": self.use_mla, "mlp_bias": self.mlp_bias}
        for name, bad in refused.items():
            if bad:
                raise ModelLoadError(f"{source}: {name} {getattr(self, name)!r} is not supported")

    def _per_layer(self, name: str, source: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, list):
            return
        if len(value) != self.num_hidden_layers:
            raise ModelLoadError(f"{source}: {name} has {len(value)} entries for {self.num_hidden_layers} layers")
        if len(set(value)) > 1:
            raise ModelLoadError(f"{source}: {name} differs between layers ({short_repr(value)}); edgemoe runs "
                                 "one expert count and one top-k for every MoE layer")

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts[0] if isinstance(self.num_experts, list) else self.num_experts

    @property
    def top_k(self) -> int:
        return self.moe_topk[0] if isinstance(self.moe_topk, list) else self.moe_topk

    @property
    def expert_dim(self) -> int:
        return self.intermediate_size

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))


def _split_ntk_alpha(config: dict, source: str) -> tuple[dict, float | None]:
    """Hunyuan configs label NTK-alpha rope "dynamic" with an `alpha`. Returns the config
    with that rope block reduced to its theta, and alpha (None for any other rope, which
    the shared reader checks). "dynamic" without alpha (dynamic NTK, whose table depends
    on the sequence length) is refused."""
    params: dict = {}
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins, as in the shared reader
        if isinstance(config.get(key), dict):
            params.update(config[key])
    if params.get("rope_type", params.get("type")) != "dynamic":
        return config, None
    if not params.get("alpha"):
        raise ModelLoadError(f"{source}: rope type 'dynamic' without an alpha (dynamic NTK scaling) is not supported")
    alpha = check_value("rope alpha", params["alpha"], float, False, source)
    out = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")}
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    return out, alpha


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    spec = AttentionSpec(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm="head",
        norm_eps=args.rms_norm_eps,
        qk_norm_after_rope=True,
    )
    H = args.hidden_size
    layers = [
        DecoderLayer(
            Attention(spec, rope),
            MoEBlock(i, Router(H, args.experts_per_layer, args.top_k, norm_topk=True),
                     shared=MLP(H, args.intermediate_size, args.hidden_act)),
            H,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return Transformer(args, layers)


sanitize = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.mlp\.gate\.wg\.weight", r"layers.\1.mlp.router.weight"),
        (r"model\.layers\.(\d+)\.mlp\.shared_mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.query_layernorm\.weight", r"layers.\1.attn.q_norm.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.key_layernorm\.weight", r"layers.\1.attn.k_norm.weight"),
    ]
)
