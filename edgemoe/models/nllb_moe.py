"""NLLB-MoE (facebook/nllb-moe-54b and NLLB-MoE-shaped models): a fairseq translation
encoder-decoder whose feed-forward is, every `*_sparse_step` layers, a top-2 MoE with
expert capacity.

- embeddings scaled by sqrt(d_model) (`scale_embedding`) plus fairseq's sinusoidal
  positions, counted from pad_token_id + 1 over non-pad tokens (pad tokens get a zero
  position embedding);
- pre-norm blocks with LayerNorm (eps 1e-5, weight and bias), attention with biases and
  1/sqrt(head_dim) scaling; encoder and decoder may have different head counts;
- MoE layers where (i + 1) % step == 0; experts are ungated fc2(act(fc1(x))) with biases;
  the top-2 router with capacity is models/capacity.py's; at inference each expert's
  output is scaled by 1 - moe_token_dropout (transformers' eval-mode token dropout);
- tied embeddings: one table for both stacks and the head (no scaling before the head).

Which expert runs a token follows transformers 4.x and fairseq (expert e computes the
tokens routed to it in either slot). transformers 5.24's NllbMoeExperts dispatches on
the one-hot top-1 mask instead (expert_0 gets every top-2 slot, expert_1 every top-1
slot), which no trained checkpoint computes; tests/models/families/test_nllb_moe.py
compares against transformers with that dispatch put right.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from ..experts import ACTIVATIONS
from .base import BaseModelArgs, check_value
from .capacity import CapacityMoEBlock, Top2CapacityRouter
from .norms import LayerNorm
from .seq2seq_blocks import FFN, DecoderLayer, EncoderLayer, Seq2SeqAttention, Seq2SeqModel, sinusoidal_positions

LN_EPS = 1e-5  # nn.LayerNorm's default: the config has no eps


@dataclass
class ModelArgs(BaseModelArgs):
    decoder_layers: int = 12
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    num_experts: int = 128
    expert_capacity: int = 64
    encoder_sparse_step: int = 4
    decoder_sparse_step: int = 4
    router_bias: bool = False
    router_dtype: str = "float32"
    second_expert_policy: str = "all"
    normalize_router_prob_before_dropping: bool = False
    batch_prioritized_routing: bool = False
    moe_token_dropout: float = 0.2
    scale_embedding: bool = True
    is_encoder_decoder: bool = True
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = 2
    tie_word_embeddings: bool = True
    hidden_act: str = "relu"
    max_position_embeddings: int = 1024
    moe_eval_capacity_token_fraction: float = 1.0  # read by from_dict (it may be negative)

    ZERO_OK = BaseModelArgs.ZERO_OK | {"encoder_sparse_step", "decoder_sparse_step", "moe_token_dropout",
                                       "pad_token_id", "decoder_start_token_id"}
    ALIASES = {"hidden_size": "d_model", "num_hidden_layers": "encoder_layers",
               "num_attention_heads": "encoder_attention_heads", "hidden_act": "activation_function"}
    LIMITS = {**BaseModelArgs.LIMITS, "decoder_layers": 1024, "decoder_attention_heads": 4096,
              "encoder_ffn_dim": 1 << 20, "decoder_ffn_dim": 1 << 20}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        # A fraction <= 0 means "use expert_capacity": not a size, so checked here.
        rest = {k: v for k, v in config.items() if k != "moe_eval_capacity_token_fraction"}
        args = super().from_dict(rest, source)
        frac = config.get("moe_eval_capacity_token_fraction", 1.0)
        if isinstance(frac, (int, float)) and not isinstance(frac, bool) and frac <= 0:
            args.moe_eval_capacity_token_fraction = float(frac)
        else:
            args.moe_eval_capacity_token_fraction = check_value("moe_eval_capacity_token_fraction", frac, float,
                                                                False, source)
        return args

    def validate(self, source: str) -> None:
        if self.router_dtype != "float32":
            raise ModelLoadError(f"{source}: router_dtype {self.router_dtype!r} is not supported (only \"float32\")")
        if self.second_expert_policy != "all":
            raise ModelLoadError(f"{source}: second_expert_policy {self.second_expert_policy!r} is not supported "
                                 "(only \"all\": the others sample the second expert at random)")
        if not self.is_encoder_decoder:
            raise ModelLoadError(f"{source}: is_encoder_decoder false (an encoder-only model) is not supported")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"{source}: activation_function {self.hidden_act!r} is not supported "
                                 f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        if self.pad_token_id is None:
            raise ModelLoadError(f"{source}: pad_token_id is missing (the sinusoidal positions count from it)")
        if self.moe_token_dropout >= 1:
            raise ModelLoadError(f"{source}: moe_token_dropout must be below 1, got {self.moe_token_dropout}")
        if self.hidden_size < 4:
            raise ModelLoadError(f"{source}: d_model must be at least 4 for sinusoidal positions")
        for heads in (self.num_attention_heads, self.decoder_attention_heads):
            if self.hidden_size % heads:
                raise ModelLoadError(f"{source}: d_model {self.hidden_size} is not a multiple of {heads} heads")
        if self.encoder_moe() and self.decoder_moe() and self.encoder_ffn_dim != self.decoder_ffn_dim:
            raise ModelLoadError(f"{source}: encoder_ffn_dim ({self.encoder_ffn_dim}) and decoder_ffn_dim "
                                 f"({self.decoder_ffn_dim}) differ: the expert store holds experts of one size")
        if self.moe_layers() and self.num_experts < 2:
            raise ModelLoadError(f"{source}: num_experts must be at least 2 for top-2 routing")
        for name in ("decoder_start_token_id", "pad_token_id"):
            if (getattr(self, name) or 0) >= self.vocab_size:
                raise ModelLoadError(f"{source}: {name} {getattr(self, name)} is outside the vocabulary")

    def encoder_moe(self) -> list[int]:
        step = self.encoder_sparse_step
        return [i for i in range(self.num_hidden_layers) if step > 0 and (i + 1) % step == 0]

    def decoder_moe(self) -> list[int]:
        step = self.decoder_sparse_step
        return [j for j in range(self.decoder_layers) if step > 0 and (j + 1) % step == 0]

    def moe_layers(self) -> list[int]:
        return self.encoder_moe() + [self.num_hidden_layers + j for j in self.decoder_moe()]

    @property
    def experts_per_layer(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return 2

    @property
    def expert_dim(self) -> int:
        return self.encoder_ffn_dim if self.encoder_moe() else self.decoder_ffn_dim

    @property
    def expert_gated(self) -> bool:
        return False


def build(args: ModelArgs) -> Seq2SeqModel:
    """The encoder-decoder for `args`; routed experts come from a provider attached later."""
    H, act = args.hidden_size, ACTIVATIONS[args.hidden_act]

    def attn(heads: int) -> Seq2SeqAttention:
        return Seq2SeqAttention(H, heads, H // heads, bias=True, scale=None)

    def mlp(layer: int, sparse: bool, inter: int):
        if not sparse:
            return FFN(H, inter, act, bias=True)
        router = Top2CapacityRouter(H, args.num_experts, args.expert_capacity, args.moe_eval_capacity_token_fraction,
                                    args.normalize_router_prob_before_dropping, args.batch_prioritized_routing,
                                    args.router_bias)
        return CapacityMoEBlock(layer, router, out_scale=1.0 - args.moe_token_dropout)

    def norm() -> LayerNorm:
        return LayerNorm(H, LN_EPS)

    enc_moe, dec_moe, L = set(args.encoder_moe()), set(args.decoder_moe()), args.num_hidden_layers
    encoder = [EncoderLayer(attn(args.num_attention_heads), mlp(i, i in enc_moe, args.encoder_ffn_dim), norm)
               for i in range(L)]
    heads = args.decoder_attention_heads
    decoder = [DecoderLayer(attn(heads), attn(heads), mlp(L + j, j in dec_moe, args.decoder_ffn_dim), norm)
               for j in range(args.decoder_layers)]
    pad = args.pad_token_id
    model = Seq2SeqModel(args, encoder, decoder, norm,
                         positions=lambda ids, offset: sinusoidal_positions(ids, H, pad, offset))
    if args.scale_embedding:
        model.embed_scale = math.sqrt(H)
    return model


_LAYER = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PARTS = {"self_attn_layer_norm": "norm1", "cross_attention_layer_norm": "norm_cross", "ff_layer_norm": "norm2",
          "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2", "ffn.router.classifier": "mlp.router"}
_ATTN = re.compile(r"(self_attn|cross_attention)\.(q|k|v|out)_proj$")
_EXPERT = re.compile(r"ffn\.experts\.expert_(\d+)\.fc([12])$")
_TABLES = {"model.shared.weight": True, "model.encoder.embed_tokens.weight": False,
           "model.decoder.embed_tokens.weight": False, "lm_head.weight": False}


def sanitize(name: str, tensor: torch.Tensor, args: ModelArgs) -> list[tuple[str, torch.Tensor]]:
    """Map checkpoint names to ours. Tied: `model.shared` is the one embedding (the
    per-stack copies and lm_head are the same tensor); untied: each stack's and the
    head's own. Decoder experts get layer ids after the encoder's."""
    if name in _TABLES:
        if _TABLES[name] != args.tie_word_embeddings:
            return []  # a tied copy, or `shared`, which untied models do not use
        return [({"model.shared.weight": "embed.weight", "model.encoder.embed_tokens.weight": "embed.weight",
                  "model.decoder.embed_tokens.weight": "dec_embed.weight"}.get(name, name), tensor)]
    if ".embed_positions." in name:
        return []  # sinusoids, derived from the config
    m = re.match(r"model\.(encoder|decoder)\.layer_norm\.(weight|bias)$", name)
    if m:
        return [(f"{m[1][:3]}_norm.{m[2]}", tensor)]
    m = _LAYER.match(name)
    if m:
        stack, i, part, what = m[1], int(m[2]), m[3], m[4]
        a, e = _ATTN.match(part), _EXPERT.match(part)
        if a and (a[1] == "self_attn" or stack == "decoder"):
            return [(f"{stack}.{i}.{'attn' if a[1] == 'self_attn' else 'cross'}.{a[2][0]}.{what}", tensor)]
        if e:
            layer = i + (args.num_hidden_layers if stack == "decoder" else 0)
            kind = "gate" if e[2] == "1" else "down"
            return [(f"experts.{layer}.{e[1]}.{kind}" + ("_bias" if what == "bias" else ""), tensor)]
        if part in _PARTS and (stack == "decoder" or part != "cross_attention_layer_norm"):
            return [(f"{stack}.{i}.{_PARTS[part]}.{what}", tensor)]
    raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint")
