"""Building blocks shared by every model family: config parsing, norms, RoPE, attention
with a KV cache, the dense gated MLP, the decoder layer and the decoder stack.

A family file (mixtral.py, qwen3_moe.py, ...) only says how these blocks are wired
and how checkpoint tensor names map onto ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..cpu import Linear, linear
from ..errors import ModelLoadError
from ..experts import ACTIVATIONS, glu
from .attention import Attention, KVCache
from .moe import MoEBlock
from .norms import RMSNorm

# ----------------------------------------------------------------------------- config


@dataclass
class BaseModelArgs:
    """Fields every family has. Families subclass this and add their own.

    `from_dict` checks every value against its field's type before the dataclass is
    built: an int field takes a JSON integer (not a bool, not 2.0), a float field any
    finite number, a bool field only true/false, `X | None` also null. Every number in
    a config is a size, a count or a scale, so it must be positive; fields named in
    ZERO_OK may also be 0, and those in LIMITS have an upper bound. `validate` then
    checks how the values fit together."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # normalised rope parameters, or None for plain RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # edgemoe's own key, written by `edgemoe prune --per-layer`: {"<MoE layer>": n} gives
    # each MoE layer's routable experts, slots 0..n-1 (the others are padding no token is
    # routed to; see `routable_experts`). Absent: every slot of every layer is routable.
    edgemoe_experts_per_layer: dict | None = None

    # Numeric fields that may be 0 (token ids; families add sizes that may be absent).
    ZERO_OK = frozenset({"bos_token_id", "eos_token_id"})
    # field -> other config key read when the field's own key is absent.
    ALIASES = {}
    # Upper bounds on the counts that size loops and lists before any weight is read, so
    # that a corrupt config fails at once instead of hanging; far above released models.
    # Upper bounds far beyond any released model (largest vocabularies ~262k, contexts 10M):
    # past them a corrupted number would make shape arithmetic overflow or hang.
    LIMITS = {"num_hidden_layers": 1024, "num_experts": 4096, "num_local_experts": 4096, "vocab_size": 1 << 24,
              "hidden_size": 1 << 17, "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096,
              "max_position_embeddings": 1 << 26, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
              "shared_expert_intermediate_size": 1 << 20}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "BaseModelArgs":
        """Build the dataclass from a parsed config.json, ignoring keys we do not use.
        Every problem is a ModelLoadError naming `source` and the key."""
        types_ = _field_types(cls)
        kwargs = {}
        for name in types_:
            if name in ("rope_theta", "rope_scaling"):
                continue  # read by _rope_from_config, from either layout
            key = name if name in config or name not in cls.ALIASES else cls.ALIASES[name]
            if key in config:
                kwargs[name] = check_value(key, config[key], types_[name], name in cls.ZERO_OK, source,
                                           cls.LIMITS.get(name))
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ModelLoadError(f"{source}: missing required key(s): {', '.join(missing)}")
        max_positions = kwargs.get("max_position_embeddings", _field_default(cls, "max_position_embeddings"))
        kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_config(config, source, max_positions)
        try:
            args = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: {e}") from None
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        if args.head_dim is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        args.validate(source)
        return args

    def validate(self, source: str) -> None:
        """Reject configs whose values (each already of the right type and sign) cannot
        describe a working model together."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim < 1 or self.head_dim % 2:
            raise ModelLoadError(
                f"{source}: head_dim must be a positive even number (RoPE rotates pairs of dimensions), "
                f"got {self.head_dim}"
            )
        if self.moe_layers() and not 0 < self.top_k <= self.experts_per_layer:
            raise ModelLoadError(
                f"{source}: num_experts_per_tok ({self.top_k}) must be between 1 and the number of experts "
                f"({self.experts_per_layer})"
            )
        self.routable_experts(source)
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(
                f"{source}: hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    def routable_experts(self, source: str = "config.json") -> dict[int, int] | None:
        """MoE layer -> how many of its expert slots (the first ones) tokens may be routed
        to, from `edgemoe_experts_per_layer`; None when every slot is. Each count is
        between top_k and the expert count, every MoE layer is listed and at least one
        layer uses every slot (else the expert count itself would be smaller)."""
        table = self.edgemoe_experts_per_layer
        if table is None:
            return None
        key = "edgemoe_experts_per_layer"
        layers = self.moe_layers()
        out = {}
        for k, n in table.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) in layers):
                raise ModelLoadError(f"{source}: {key} must be an object mapping each MoE layer ({layers}) to its "
                                     f"expert count; {k!r} is not an MoE layer")
            if isinstance(n, bool) or not isinstance(n, int) or not self.top_k <= n <= self.experts_per_layer:
                raise ModelLoadError(f"{source}: {key}[{k!r}] must be an integer between num_experts_per_tok "
                                     f"({self.top_k}) and the number of experts ({self.experts_per_layer}), "
                                     f"got {short_repr(n)}")
            out[int(k)] = n
        missing = [l for l in layers if l not in out]
        if missing:
            raise ModelLoadError(f"{source}: {key} does not list MoE layer(s) {missing}")
        if max(out.values()) != self.experts_per_layer:
            raise ModelLoadError(f"{source}: {key}: no layer uses all {self.experts_per_layer} experts")
        return dict(sorted(out.items()))

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Uniform view of the MoE shape, used by loaders, the expert store and the runtime.
    # Families map their own config names onto these properties.
    @property
    def experts_per_layer(self) -> int:
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    @property
    def expert_dim(self) -> int:
        """Intermediate size of one routed expert."""
        raise NotImplementedError

    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers that have routed experts."""
        raise NotImplementedError

    @property
    def expert_act(self) -> str:
        """The gated activation routed experts are built with (a name `experts.glu` knows)."""
        return self.hidden_act

    @property
    def expert_gated(self) -> bool:
        """Whether routed experts are gated (gate, up, down) or ungated (one input matrix
        and down, act(w1 x): Switch Transformers, NLLB-MoE; stored as gate and down)."""
        return True


_TYPE_CACHE: dict[type, dict[str, object]] = {}


def _field_types(cls: type) -> dict[str, object]:
    """Resolved type of each dataclass field (annotations are strings here)."""
    if cls not in _TYPE_CACHE:
        hints = typing.get_type_hints(cls)
        _TYPE_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _TYPE_CACHE[cls]


def _field_default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _members(tp) -> tuple:
    """The alternatives of a union type (`int | None` -> (int, NoneType)), or (tp,)."""
    return typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType, typing.Union) else (tp,)


def _conforms(value, tp) -> bool:
    for t in _members(tp):
        if typing.get_origin(t) is list:
            if isinstance(value, list) and all(_conforms(v, typing.get_args(t)[0]) for v in value):
                return True
        elif t is type(None):
            if value is None:
                return True
        elif t is bool or isinstance(value, bool):  # JSON true/false are not numbers here
            if t is bool and isinstance(value, bool):
                return True
        elif t is float:
            if isinstance(value, (int, float)):
                return True
        elif t in (int, str, dict):
            if isinstance(value, t):
                return True
        else:
            raise TypeError(f"config fields of type {t} are not supported by check_value")
    return False


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               type(None): "null"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans", dict: "objects"}


def _describe(tp) -> str:
    words = []
    for t in _members(tp):
        if typing.get_origin(t) is list:
            words.append("a list of " + _PLURALS[typing.get_args(t)[0]])
        else:
            words.append(_TYPE_WORDS[t])
    return " or ".join(words)


def short_repr(value, limit: int = 60) -> str:
    """repr for an error message: one line, at most about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_value(name: str, value, tp, zero_ok: bool, source: str, limit: int | None = None):
    """Check one config value against a field type (see BaseModelArgs) and return it,
    ints widened to float for float fields. Numbers must be finite and positive (or
    zero, with zero_ok) and at most `limit`; lists are checked element by element."""
    if not _conforms(value, tp):
        raise ModelLoadError(f"{source}: {name} must be {_describe(tp)}, got {short_repr(value)}")
    for x in value if isinstance(value, list) else [value]:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if not math.isfinite(x):
            raise ModelLoadError(f"{source}: {name} must be a finite number, got {short_repr(value)}")
        if x < 0 or (x == 0 and not zero_ok):
            sign = "non-negative" if zero_ok else "positive"
            raise ModelLoadError(f"{source}: {name} must be {sign}, got {short_repr(value)}")
        if limit is not None and x > limit:
            raise ModelLoadError(f"{source}: {name} {x} is implausibly large (edgemoe supports up to {limit})")
    if isinstance(value, int) and not isinstance(value, bool) and float in _members(tp) and int not in _members(tp):
        value = float(value)
    return value


SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")

# Rope parameters we read, with their types; the ones that may be 0 mean "absent".
ROPE_FIELDS = {
    "factor": float | None,
    "original_max_position_embeddings": int,
    "low_freq_factor": float,
    "high_freq_factor": float,
    "attention_factor": float | None,
    "mscale": float | None,
    "mscale_all_dim": float | None,
    "beta_fast": float | None,
    "beta_slow": float | None,
    "truncate": bool,
}
ROPE_ZERO_OK = frozenset({"mscale", "mscale_all_dim", "beta_fast", "beta_slow"})


def _rope_from_config(config: dict, source: str, max_positions: int = 4096) -> tuple[float, dict | None]:
    """Read rope theta and scaling from either the legacy (`rope_theta`, `rope_scaling`)
    or the transformers-5 (`rope_parameters`) layout, checking every value we use.
    `max_positions` is the (checked) max_position_embeddings."""
    params: dict = {}
    where: dict[str, str] = {}  # key -> how to name it in an error
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins
        block = config.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ModelLoadError(f"{source}: {key} must be an object or null, got {short_repr(block)}")
        params.update(block)
        where.update({k: f"{key}.{k}" for k in block})
    if "rope_theta" in params:
        theta = check_value(where["rope_theta"], params.pop("rope_theta"), float, False, source)
    else:
        theta = check_value("rope_theta", config.get("rope_theta", 10000.0), float, False, source)
    if theta <= 1:  # frequencies theta^(-2i/d) must fall with i; log(theta) divides in yarn
        raise ModelLoadError(f"{source}: {where.get('rope_theta', 'rope_theta')} must be greater than 1, got {theta!r}")
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE:
        raise ModelLoadError(
            f"{source}: rope type {short_repr(rope_type)} is not supported (supported: {', '.join(SUPPORTED_ROPE)})"
        )
    if rope_type == "default":
        return theta, None
    for key, tp in ROPE_FIELDS.items():
        if key in params:
            params[key] = check_value(where.get(key, key), params[key], tp, key in ROPE_ZERO_OK, source)
    params["rope_type"] = rope_type
    params.setdefault("original_max_position_embeddings", max_positions)
    if params.get("factor") is None:
        if rope_type != "yarn":
            raise ModelLoadError(f"{source}: rope type {rope_type!r} needs a 'factor'")
        # As transformers does: yarn without a factor scales from the original context.
        params["factor"] = max_positions / params["original_max_position_embeddings"]
    # Equal factors (Llama 4 Scout ships 1.0 and 1.0) leave no smoothed band: a hard cut at
    # the original context, which transformers accepts with a warning.
    if rope_type == "llama3" and not params.get("low_freq_factor", 1.0) <= params.get("high_freq_factor", 4.0):
        raise ModelLoadError(f"{source}: llama3 rope needs low_freq_factor < high_freq_factor (or the two equal)")
    return theta, params


# ----------------------------------------------------------------------------- small blocks

class MLP(nn.Module):
    """Gated feed-forward block: down(act(gate(x)) * up(x)). Used for dense layers and
    shared experts. With `bias` all three projections carry one (ERNIE's use_bias)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.gate = Linear(hidden, intermediate, bias=bias)
        self.up = Linear(hidden, intermediate, bias=bias)
        self.down = Linear(intermediate, hidden, bias=bias)
        self.glu = glu(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.glu(self.gate(x), self.up(x)))


# ----------------------------------------------------------------------------- decoder


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)). `mlp` is a dense MLP
    or an MoE block."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.norm1 = RMSNorm(hidden, eps)
        self.norm2 = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        one = x.shape[0] == 1 and x.shape[1] == 1 and type(self.attn) is Attention  # not MLA, not a subclass
        h = self.attn.decode_half(x, self.norm1, cache) if one else None
        x = h if h is not None else x + self.attn(self.norm1(x), cache)  # (1, 1, H): one C call when it qualifies
        if one and type(self.mlp) is MoEBlock:  # the residual add joins the experts' combine
            return self.mlp(self.norm2(x), residual=x)
        return x + self.mlp(self.norm2(x))


class ScaledDecoderLayer(DecoderLayer):
    """Pre-norm block whose branch outputs are scaled before each residual add:
    x + s * attn(norm1(x)), then + s * mlp(norm2(x)) (Granite's residual_multiplier)."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, eps: float, residual_scale: float):
        super().__init__(attn, mlp, hidden, eps)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache) * self.residual_scale
        return x + self.mlp(self.norm2(x)) * self.residual_scale


class PostNormDecoderLayer(DecoderLayer):
    """OLMo2-style block: the norms apply to each branch's output before the residual
    add: x + norm1(attn(x)), then + norm2(mlp(x)); the input is never normalised."""

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.norm1(self.attn(x, cache))
        return x + self.norm2(self.mlp(x))


class Transformer(nn.Module):
    """Embedding, decoder layers, final norm and LM head. Families build the layers.
    `lm_head_bias` gives the (untied) LM head a bias (Phi-3.5-MoE, ERNIE's use_bias)."""

    def __init__(self, args: BaseModelArgs, layers: list[DecoderLayer], lm_head_bias: bool = False):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if lm_head_bias and args.tie_word_embeddings:
            raise ValueError("an LM head tied to the embedding has no bias")
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=lm_head_bias)
        # Multipliers some families apply (Granite: embedding and logits scaling).
        self.embed_scale: float | None = None
        self.logits_scale: float | None = None
        self.logits_softcap: float | None = None  # Gemma: logits become cap * tanh(logits / cap)

    def make_cache(self, capacity: int | None = None) -> list[KVCache]:
        """One KV cache per layer; `capacity` positions each (None: grow as needed)."""
        return [layer.attn.make_cache(capacity) for layer in self.layers]

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of cached state one position takes over all layers."""
        elem = torch.empty(0, dtype=dtype or self.embed.weight.dtype).element_size()
        return sum(layer.attn.kv_bytes_per_token(elem) for layer in self.layers)

    def state_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of fixed-size state one sequence keeps whatever its length (recurrent
        layers' conv windows and scan states, see models/recurrent.py); 0 without them."""
        elem = torch.empty(0, dtype=dtype or self.embed.weight.dtype).element_size()
        return sum(layer.attn.state_bytes(elem) for layer in self.layers if hasattr(layer.attn, "state_bytes"))

    def forward(
        self, ids: torch.Tensor, cache: list[KVCache] | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only."""
        x = self.embed(ids)  # (B, T, H)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache is not None else None)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) from the residual stream after the last layer (B, T, H): the
        final norm, the LM head and the families' logit transforms. Tools that rerun the
        tail of a forward (the bitwidth profiler) end with it, so they stay exact."""
        x = self.norm(x)
        if self.args.tie_word_embeddings:
            logits = linear(x, self.embed.weight)  # (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V); a module, so it can be swapped for a quantized one
        if self.logits_softcap is not None:
            logits = torch.tanh(logits / self.logits_softcap) * self.logits_softcap
        return logits if self.logits_scale is None else logits * self.logits_scale

    def moe_blocks(self) -> Iterator[nn.Module]:
        for layer in self.layers:
            if hasattr(layer.mlp, "router"):
                yield layer.mlp

    def resident_names(self) -> set[str]:
        """Names of the tensors the model itself owns (everything except routed experts)."""
        return {name for name, _ in self.named_parameters()}

    def fp32_names(self) -> set[str]:
        """Resident tensors loaded in fp32 whatever the compute dtype (modules list them in
        `fp32_params`, e.g. routers that choose experts in fp32 as transformers does)."""
        return {f"{mn}.{pn}" if mn else pn for mn, m in self.named_modules()
                for pn in getattr(m, "fp32_params", ()) if getattr(m, pn, None) is not None}


# ----------------------------------------------------------------------------- sanitize

# Canonical expert key: experts.<layer>.<expert>.<part>, part gate|up|down (float weights),
# optionally with a suffix: <gate|up|down>_bias (float biases, gpt-oss) or _blocks/_scales
# (MXFP4 codes and shared exponents as stored, see quant/mxfp4.py). Group 3 is the part.
EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(\d+)\.((?:gate|up|down)(?:_bias|_blocks|_scales)?)$")

# Tensor names shared by the Llama-style families, as regex -> our name.
COMMON_RULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.norm1.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.norm2.weight"),
    # Dense MLP layers and shared experts.
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"layers.\1.mlp.shared_gate.weight"),
    # Router.
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"layers.\1.mlp.router.weight"),
    # Per-expert layout, as written on disk by HF.
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", r"experts.\1.\2.\3"),
]

_FUSED = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)")


def make_sanitizer(rules: list[tuple[str, str]]) -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """Build a family's `sanitize(name, tensor)` from renaming rules (family rules first,
    then the common ones). Fused 3-D expert tensors are split into per-expert tensors."""
    compiled = [(re.compile(p + "$"), r) for p, r in rules + COMMON_RULES]

    def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        fused = _FUSED.match(name)
        if fused:
            return _split_fused(int(fused.group(1)), fused.group(2), name, tensor)
        for pattern, repl in compiled:
            if pattern.match(name):
                return [(pattern.sub(repl, name), tensor)]
        if name.endswith("rotary_emb.inv_freq"):
            return []  # derived from the config, never loaded
        raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint")

    return sanitize


def _split_fused(layer: int, kind: str, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    # transformers 5 in-memory layout: gate_up_proj (E, 2I, H), down_proj (E, H, I).
    if t.dim() != 3:
        raise ModelLoadError(f"fused expert tensor {name!r} should be 3-D, got shape {tuple(t.shape)}")
    out = []
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            gate, up = t[e].chunk(2, dim=0)
            out += [(f"experts.{layer}.{e}.gate", gate), (f"experts.{layer}.{e}.up", up)]
        else:
            out.append((f"experts.{layer}.{e}.down", t[e]))
    return out


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def past_last_layer(name: str, args: BaseModelArgs) -> bool:
    """Whether `name` belongs to a decoder layer past the config's last one: the
    multi-token-prediction layers DeepSeek-V3 and GLM-4.5 ship after the decoder (only
    used to draft tokens; transformers skips them on load too)."""
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= args.num_hidden_layers


def is_moe_layer(layer: int, num_experts: int, sparse_step: int = 1, mlp_only: Iterable[int] = ()) -> bool:
    """Qwen-style rule for which layers are MoE (others are dense MLPs)."""
    return layer not in set(mlp_only) and num_experts > 0 and (layer + 1) % max(sparse_step, 1) == 0
