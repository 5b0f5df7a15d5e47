"""Llama 4 text models (meta-llama/Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E).

Differences from Mixtral:
- the router takes the top k of the raw logits and weights each chosen expert by the
  sigmoid of its logit; the weight scales the expert's *input*, and an always-on shared
  expert (width `intermediate_size`, like the routed ones) is added;
- MoE layers are those in `moe_layers` (default: every `interleave_moe_layer_step`-th);
  the others are dense MLPs of width `intermediate_size_mlp`;
- layers with RoPE (`no_rope_layers[i] == 1`) rotate adjacent channel pairs, L2-normalise
  q and k after the rotation (`use_qk_norm`) and attend only within their chunk of
  `attention_chunk_size` positions; the other layers (NoPE) attend globally and scale q
  by a position-dependent temperature (`attn_temperature_tuning`, `floor_scale`,
  `attn_scale`).

Released checkpoints are multimodal (model_type "llama4"): the text model's settings sit
in `text_config` and its tensors under `language_model.`; the vision tower and projector
are dropped. Text-only checkpoints ("llama4_text", Llama4ForCausalLM) load as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .attention import Attention, AttentionSpec
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, make_sanitizer, short_repr
from .moe import MoEBlock
from .rope import RoPE
from .routers import InputScaledRouter

DEFAULT_THETA = 500000.0  # Llama4TextConfig's rope_theta when a config names none
LAYER_TYPES = ("chunked_attention", "full_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are transformers' Llama4TextConfig ones (a config without the key means them).
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    intermediate_size: int = 8192  # one routed expert, and the shared expert
    intermediate_size_mlp: int = 16384  # dense layers
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layer_ids: list[int] | None = None  # config.json "moe_layers"
    interleave_moe_layer_step: int = 1
    no_rope_layers: list[int] | None = None  # per layer: 1 = RoPE (chunked), 0 = NoPE (global)
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    use_qk_norm: bool = True
    attn_temperature_tuning: bool | int = True  # released configs write 4: any non-zero value is on
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    attention_bias: bool = False

    ZERO_OK = BaseModelArgs.ZERO_OK | {"moe_layer_ids", "no_rope_layers", "attn_temperature_tuning", "attn_scale"}
    ALIASES = {"moe_layer_ids": "moe_layers"}
    LIMITS = {**BaseModelArgs.LIMITS, "intermediate_size_mlp": 1 << 20}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Read a text-only config, or the `text_config` of a multimodal one (whose outer
        model_type is kept: it names the checkpoint)."""
        if config.get("model_type") == "llama4":
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ModelLoadError(f"{source}: text_config must be an object, got {short_repr(text)}")
            config, source = {**text, "model_type": "llama4"}, f"{source}: text_config"
        blocks = [config.get(k) for k in ("rope_scaling", "rope_parameters")]
        if "rope_theta" not in config and not any(isinstance(b, dict) and "rope_theta" in b for b in blocks):
            config = {**config, "rope_theta": DEFAULT_THETA}
        return super().from_dict(config, source)

    def __post_init__(self):
        n = self.num_hidden_layers
        # transformers' rules (Llama4TextConfig.__post_init__) for the lists a config may omit.
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if self.moe_layer_ids is None:
            step = self.interleave_moe_layer_step
            self.moe_layer_ids = list(range(step - 1, n, step))
        if self.layer_types is None:
            chunked = self.attention_chunk_size is not None
            self.layer_types = ["chunked_attention" if r and chunked else "full_attention"
                                for r in self.no_rope_layers[:n]]

    def validate(self, source: str) -> None:
        super().validate(source)
        n = self.num_hidden_layers
        if len(self.no_rope_layers) < n or not set(self.no_rope_layers) <= {0, 1}:
            raise ModelLoadError(f"{source}: no_rope_layers must hold 0 (NoPE) or 1 (RoPE) for each of the {n} "
                                 f"layers, got {short_repr(self.no_rope_layers)}")
        if any(i >= n for i in self.moe_layer_ids):
            raise ModelLoadError(f"{source}: moe_layers {short_repr(self.moe_layer_ids)} names layers past the "
                                 f"{n} the model has")
        if len(self.layer_types) != n:
            raise ModelLoadError(f"{source}: layer_types has {len(self.layer_types)} entries for {n} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelLoadError(f"{source}: unsupported layer_types entries: {', '.join(unknown)} "
                                 f"(supported: {', '.join(LAYER_TYPES)})")
        if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
            raise ModelLoadError(f"{source}: layer_types has chunked_attention layers but attention_chunk_size is null")

    def uses_rope(self, layer: int) -> bool:
        return self.no_rope_layers[layer] == 1

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
        return sorted(set(self.moe_layer_ids))


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    # Llama 4 rotates adjacent pairs (its complex form); interleaved RoPE gives the same
    # q.k products, and the per-head L2 norm and temperature do not see the channel order.
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling, interleaved=True)
    temperature = (args.floor_scale, args.attn_scale) if args.attn_temperature_tuning else None
    moe = set(args.moe_layers())
    H = args.hidden_size
    layers = []
    for i in range(args.num_hidden_layers):
        rotary = args.uses_rope(i)
        spec = AttentionSpec(
            hidden=H,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm="l2" if args.use_qk_norm and rotary else None,
            norm_eps=args.rms_norm_eps,
            use_rope=rotary,
            chunk=args.attention_chunk_size if args.layer_types[i] == "chunked_attention" else None,
            temperature=None if rotary else temperature,
        )
        if i in moe:
            router = InputScaledRouter(H, args.num_local_experts, args.num_experts_per_tok)
            mlp = MoEBlock(i, router, shared=MLP(H, args.intermediate_size, args.hidden_act))
        else:
            mlp = MLP(H, args.intermediate_size_mlp, args.hidden_act)
        layers.append(DecoderLayer(Attention(spec, rope), mlp, H, args.rms_norm_eps))
    return Transformer(args, layers)


_rename = make_sanitizer(
    [
        (r"model\.layers\.(\d+)\.feed_forward\.router\.weight", r"layers.\1.mlp.router.weight"),
        (r"model\.layers\.(\d+)\.feed_forward\.shared_expert\.(gate|up|down)_proj\.weight",
         r"layers.\1.mlp.shared.\2.weight"),
        (r"model\.layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2.weight"),
        # Per-expert layout, as some re-exported checkpoints store it.
        (r"model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight", r"experts.\1.\2.\3"),
    ]
)
_FUSED = re.compile(r"model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")
_NOT_TEXT = ("vision_model.", "multi_modal_projector.")  # the multimodal checkpoints' image side


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours: drop the image side of multimodal checkpoints, strip
    their `language_model.` prefix, split the fused experts."""
    if name.startswith(_NOT_TEXT):
        return []
    name = name.removeprefix("language_model.")
    fused = _FUSED.match(name)
    if fused:
        return _split_experts(int(fused.group(1)), fused.group(2), name, tensor)
    return _rename(name, tensor)


def _split_experts(layer: int, kind: str, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    # Stored input-major: gate_up_proj (E, H, 2I) with the gate in the first I columns,
    # down_proj (E, I, H); ours are (out, in) matrices.
    if t.dim() != 3 or (kind == "gate_up_proj" and t.shape[2] % 2):
        want = "(experts, hidden, 2 * intermediate)" if kind == "gate_up_proj" else "(experts, intermediate, hidden)"
        raise ModelLoadError(f"fused expert tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
    out = []
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            gate, up = t[e].t().chunk(2, dim=0)  # (I, H) x2
            out += [(f"experts.{layer}.{e}.gate", gate.contiguous()), (f"experts.{layer}.{e}.up", up.contiguous())]
        else:
            out.append((f"experts.{layer}.{e}.down", t[e].t().contiguous()))  # (H, I)
    return out
