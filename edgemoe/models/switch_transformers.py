"""Switch Transformers (google/switch-base-8 ... -256, switch-large-128, switch-c-2048):
the EdgeMoE paper's own models. A T5 encoder-decoder whose feed-forward is, every
`num_layers // num_sparse_*_layers` layers, a top-1 MoE with expert capacity.

- T5 blocks: pre-norm with RMSNorm (T5's LayerNorm: no mean, no bias), attention with no
  biases and no 1/sqrt(d) scaling, `num_heads` heads of `d_kv`; a relative position bias
  (bucketed, learned per head) computed by each stack's first layer and added in every
  layer: bidirectional in the encoder, causal in the decoder; none in cross-attention;
- MoE layers where `i % step == 1` (every layer when step is 1), transformers' rule;
- experts are ungated, wo(act(wi(x))) with `dense_act_fn` (relu); the router is top-1
  with capacity per sequence (models/capacity.py);
- with tied embeddings the decoder output is scaled by d_model^-0.5 before the LM head;
  untied (transformers 5), the encoder, the decoder and the head each have their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from ..experts import ACTIVATIONS
from .base import BaseModelArgs
from .capacity import CapacityMoEBlock, Top1CapacityRouter
from .norms import RMSNorm
from .seq2seq_blocks import FFN, DecoderLayer, EncoderLayer, RelativePositionBias, Seq2SeqAttention, Seq2SeqModel


@dataclass
class ModelArgs(BaseModelArgs):
    d_ff: int = 2048  # dense layers and every expert
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_sparse_encoder_layers: int = 3
    num_sparse_decoder_layers: int = 3
    num_experts: int = 8
    expert_capacity: int = 64
    router_bias: bool = False
    router_dtype: str = "float32"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    is_encoder_decoder: bool = True
    pad_token_id: int | None = 0
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = True
    hidden_act: str = "relu"
    max_position_embeddings: int = 512  # relative positions: this only sizes the context

    ZERO_OK = BaseModelArgs.ZERO_OK | {"num_sparse_encoder_layers", "num_sparse_decoder_layers", "pad_token_id",
                                       "decoder_start_token_id"}
    ALIASES = {"hidden_size": "d_model", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
               "head_dim": "d_kv", "hidden_act": "dense_act_fn", "rms_norm_eps": "layer_norm_epsilon"}
    LIMITS = {**BaseModelArgs.LIMITS, "num_decoder_layers": 1024, "d_ff": 1 << 20}

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_hidden_layers
        if self.decoder_start_token_id is None:  # transformers' generate falls back to bos
            self.decoder_start_token_id = self.bos_token_id

    def validate(self, source: str) -> None:
        if self.router_dtype != "float32":
            raise ModelLoadError(f"{source}: router_dtype {self.router_dtype!r} is not supported (only \"float32\")")
        if not self.is_encoder_decoder:
            raise ModelLoadError(f"{source}: is_encoder_decoder false (an encoder-only model) is not supported")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"{source}: dense_act_fn {self.hidden_act!r} is not supported "
                                 f"(supported: {', '.join(sorted(ACTIVATIONS))}; gated feed-forwards are not)")
        if self.relative_attention_num_buckets < 4 or \
                self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ModelLoadError(f"{source}: relative_attention_max_distance ({self.relative_attention_max_distance}) "
                                 f"must exceed half of relative_attention_num_buckets "
                                 f"({self.relative_attention_num_buckets}, at least 4)")
        if self.decoder_start_token_id is None:
            raise ModelLoadError(f"{source}: decoder_start_token_id is missing (and there is no bos_token_id)")
        for name in ("decoder_start_token_id", "pad_token_id"):
            if (getattr(self, name) or 0) >= self.vocab_size:
                raise ModelLoadError(f"{source}: {name} {getattr(self, name)} is outside the vocabulary")

    @staticmethod
    def _sparse(layers: int, sparse: int) -> list[int]:
        """transformers' rule: step = layers // sparse (layers when sparse is 0), MoE where
        i % step == 1, or everywhere with step 1; none when step is 0."""
        step = layers // sparse if sparse > 0 else layers
        return [i for i in range(layers) if step > 0 and (i % step == 1 or step == 1)]

    def encoder_moe(self) -> list[int]:
        return self._sparse(self.num_hidden_layers, self.num_sparse_encoder_layers)

    def decoder_moe(self) -> list[int]:
        return self._sparse(self.num_decoder_layers, self.num_sparse_decoder_layers)

    def moe_layers(self) -> list[int]:
        return self.encoder_moe() + [self.num_hidden_layers + j for j in self.decoder_moe()]

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return 1

    @property
    def expert_dim(self) -> int:
        return self.d_ff

    @property
    def expert_gated(self) -> bool:
        return False


def build(args: ModelArgs) -> Seq2SeqModel:
    """The encoder-decoder for `args`; routed experts come from a provider attached later."""
    H, act = args.hidden_size, ACTIVATIONS[args.hidden_act]

    def attn() -> Seq2SeqAttention:
        return Seq2SeqAttention(H, args.num_attention_heads, args.head_dim, bias=False, scale=1.0)

    def mlp(layer: int, sparse: bool):
        if sparse:
            return CapacityMoEBlock(layer, Top1CapacityRouter(H, args.num_experts, args.expert_capacity,
                                                              args.router_bias))
        return FFN(H, args.d_ff, act, bias=False)

    def norm() -> RMSNorm:
        return RMSNorm(H, args.rms_norm_eps)

    enc_moe, dec_moe = set(args.encoder_moe()), set(args.decoder_moe())
    encoder = [EncoderLayer(attn(), mlp(i, i in enc_moe), norm) for i in range(args.num_hidden_layers)]
    L = args.num_hidden_layers
    decoder = [DecoderLayer(attn(), attn(), mlp(L + j, j in dec_moe), norm) for j in range(args.num_decoder_layers)]
    buckets, dist = args.relative_attention_num_buckets, args.relative_attention_max_distance
    model = Seq2SeqModel(args, encoder, decoder, norm,
                         enc_rel=RelativePositionBias(buckets, dist, args.num_attention_heads, bidirectional=True),
                         dec_rel=RelativePositionBias(buckets, dist, args.num_attention_heads, bidirectional=False))
    if args.tie_word_embeddings:
        model.head_scale = H**-0.5
    return model


_STACK = r"(encoder|decoder)\.block\.(\d+)\.layer\."
_RULES = [(re.compile(p + "$"), r) for p, r in [
    (_STACK + r"0\.SelfAttention\.([qkvo])\.weight", r"\1.\2.attn.\3.weight"),
    (_STACK + r"1\.EncDecAttention\.([qkvo])\.weight", r"\1.\2.cross.\3.weight"),
    (_STACK + r"0\.layer_norm\.weight", r"\1.\2.norm1.weight"),
    (r"(decoder)\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"\1.\2.norm_cross.weight"),
]]
_REL = re.compile(r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$")
_FF = re.compile(_STACK + r"(\d)\.(layer_norm|mlp\.(wi|wo|router\.classifier)|mlp\.experts\.expert_(\d+)\.(wi|wo))\."
                 r"(weight|bias)$")
_TABLES = {"shared.weight": True, "encoder.embed_tokens.weight": False, "decoder.embed_tokens.weight": False,
           "lm_head.weight": False}


def sanitize(name: str, tensor: torch.Tensor, args: ModelArgs) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours. Tied: `shared` is the one embedding (the per-stack
    copies and lm_head are the same tensor); untied: each stack's and the head's own.
    Decoder experts get layer ids after the encoder's."""
    if name in _TABLES:
        if _TABLES[name] != args.tie_word_embeddings:
            return []  # a tied copy, or `shared`, which untied models do not use
        return [({"shared.weight": "embed.weight", "encoder.embed_tokens.weight": "embed.weight",
                  "decoder.embed_tokens.weight": "dec_embed.weight"}.get(name, name), tensor)]
    if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        return [(f"{name[:3]}_norm.weight", tensor)]
    m = _REL.match(name)
    if m:
        return [(f"{m[1][:3]}_rel.weight", tensor)]
    for pattern, repl in _RULES:
        if pattern.match(name):
            return [(pattern.sub(repl, name), tensor)]
    m = _FF.match(name)
    ff = 2 if m and m[1] == "decoder" else 1  # the feed-forward sublayer's index in a block
    if m and int(m[3]) == ff:
        stack, i, kind, wpart, e, epart, what = m[1], int(m[2]), m[4], m[5], m[6], m[7], m[8]
        if kind == "layer_norm" and what == "weight":
            return [(f"{stack}.{i}.norm2.weight", tensor)]
        if e is not None and what == "weight":
            layer = i + (args.num_hidden_layers if stack == "decoder" else 0)
            return [(f"experts.{layer}.{e}.{'gate' if epart == 'wi' else 'down'}", tensor)]
        if wpart == "router.classifier":
            return [(f"{stack}.{i}.mlp.router.{what}", tensor)]
        if wpart in ("wi", "wo") and what == "weight":
            return [(f"{stack}.{i}.mlp.{'fc1' if wpart == 'wi' else 'fc2'}.weight", tensor)]
    raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint")
