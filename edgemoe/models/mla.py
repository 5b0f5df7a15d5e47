"""Multi-head latent attention (MLA) and what the MLA families share (DeepSeek-V2,
DeepSeek-V3 / Moonlight, GLM-4.7-Flash).

MLA projects each token to a small latent: c = norm(kv_a(x))[:kv_lora_rank] plus one
RoPE key k_pe (qk_rope_head_dim) shared by every head. The cache keeps only these
(kv_lora_rank + qk_rope_head_dim values a position, not 2 * heads * head_dim); the
per-head keys and values are kv_b(c) = [k_nope | v]. Queries are q_proj(x), or
q_b(norm(q_a(x))) with q_lora_rank, split into a no-RoPE part and a RoPE part.

Two equal ways to attend, picked per call by their cost:
- expanded: K/V for every cached position from kv_b, then ordinary attention (cheap
  for a long prefill chunk: the expansion is paid once for many queries);
- absorbed: kv_b's key half folded into the queries (q_nope @ W_uk lives in latent
  space) and its value half applied after attention, so scores and values read the
  latent cache directly (decode: no per-step expansion of the whole context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import Linear, linear
from ..errors import ContextLengthError, ModelLoadError
from .base import MLP, BaseModelArgs, DecoderLayer, Transformer, make_sanitizer, past_last_layer
from .moe import MoEBlock
from .norms import RMSNorm
from .rope import RoPE
from .routers import Router
from .rows import RowCaches

# ----------------------------------------------------------------------------- cache


class MLACache:
    """The latent cache of one MLA layer: per position the normed kv latent and the
    rotated shared key, [c | k_pe], in one (B, positions, kv_lora_rank + rope_dim) buffer.

    Same contract as attention.KVCache: with a `capacity` the buffer is allocated once
    for every position at the first update and a step past it raises
    ContextLengthError; without one it grows in steps. `offset` positions are valid;
    `trim` forgets the last ones (prompt-prefix reuse)."""

    STEP = 256

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.latent: torch.Tensor | None = None
        self.offset = 0

    def update(self, latent: torch.Tensor) -> torch.Tensor:
        """Append latent (B, T, D) at `offset`; returns every valid position (B, offset+T, D)."""
        B, T, D = latent.shape
        end = self.offset + T
        if self.capacity is not None and end > self.capacity:
            raise ContextLengthError(
                f"the context is full: {end} tokens do not fit the context size of {self.capacity} "
                "(--ctx-size / ctx_size)")
        if self.latent is None or end > self.latent.shape[1]:
            cap = self.capacity or (end + self.STEP - 1) // self.STEP * self.STEP
            grown = latent.new_empty(B, cap, D)
            if self.latent is not None:
                grown[:, : self.offset] = self.latent[:, : self.offset]
            self.latent = grown
        self.latent[:, self.offset : end] = latent
        self.offset = end
        return self.latent[:, :end]

    def trim(self, n: int) -> None:
        """Forget the last n positions (used to reuse a prompt prefix)."""
        self.offset = max(0, self.offset - n)


# ----------------------------------------------------------------------------- attention


@dataclass
class MLASpec:
    hidden: int
    heads: int
    q_lora_rank: int | None  # None: one full q projection (DeepSeek-V2-Lite, Moonlight)
    kv_lora_rank: int
    nope_dim: int  # qk_nope_head_dim
    rope_dim: int  # qk_rope_head_dim
    v_dim: int  # v_head_dim
    scale: float  # softmax scale of q.k
    bias: bool = False  # attention_bias: on q_a, kv_a and o (never q, q_b or kv_b)
    norm_eps: float = 1e-6  # q_a / kv_a norms: transformers builds them with the default eps


class LatentUp(nn.Module):
    """kv_b: latent (kv_lora_rank) -> per-head [k_nope | v]. Not a Linear on purpose: the
    absorbed path reads slices of its weight, so `--resident int8` must leave it in float."""

    def __init__(self, rank: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, rank))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return linear(c, self.weight)


class MLAttention(nn.Module):
    """Multi-head latent attention with a latent cache (see the module docstring).

    `absorb` forces a path (True: absorbed, False: expanded); None picks the cheaper one
    for each call from the number of queries and cached positions."""

    def __init__(self, spec: MLASpec, rope: RoPE):
        super().__init__()
        s = self.spec = spec
        qk = s.nope_dim + s.rope_dim
        if s.q_lora_rank is None:
            self.q = Linear(s.hidden, s.heads * qk, bias=False)
        else:
            self.q_a = Linear(s.hidden, s.q_lora_rank, bias=s.bias)
            self.q_a_norm = RMSNorm(s.q_lora_rank, s.norm_eps)
            self.q_b = Linear(s.q_lora_rank, s.heads * qk, bias=False)
        self.kv_a = Linear(s.hidden, s.kv_lora_rank + s.rope_dim, bias=s.bias)
        self.kv_a_norm = RMSNorm(s.kv_lora_rank, s.norm_eps)
        self.kv_b = LatentUp(s.kv_lora_rank, s.heads * (s.nope_dim + s.v_dim))
        self.o = Linear(s.heads * s.v_dim, s.hidden, bias=s.bias)
        self.rope = rope
        self.absorb: bool | None = None

    def make_cache(self, capacity: int | None) -> MLACache:
        return MLACache(capacity)

    def kv_bytes_per_token(self, elem: int) -> int:
        """Bytes one cached position takes: the latent and the shared RoPE key."""
        return (self.spec.kv_lora_rank + self.spec.rope_dim) * elem

    def forward(self, x: torch.Tensor, cache: MLACache | None) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape  # (B, T, H)
        q = self.q(x) if s.q_lora_rank is None else self.q_b(self.q_a_norm(self.q_a(x)))  # (B, T, heads*qk)
        q = q.view(B, T, s.heads, s.nope_dim + s.rope_dim).transpose(1, 2)  # (B, heads, T, qk)
        q_nope, q_pe = q.split([s.nope_dim, s.rope_dim], dim=-1)
        c, k_pe = self.kv_a(x).split([s.kv_lora_rank, s.rope_dim], dim=-1)  # (B, T, R), (B, T, P)
        rows = cache if isinstance(cache, RowCaches) else None  # sequences at their own positions (models/rows.py)
        offset = cache.offset if cache is not None and rows is None else 0
        if rows is None:
            q_pe, k_pe = self.rope(q_pe, k_pe.unsqueeze(1), offset)  # (B, heads, T, P), (B, 1, T, P)
        else:
            q_pe, k_pe = rows.rope(self.rope, q_pe, k_pe.unsqueeze(1))
        latent = torch.cat([self.kv_a_norm(c), k_pe.squeeze(1)], dim=-1)  # (B, T, R+P)
        if rows is None:
            out = self._attend(q_nope, q_pe, latent, cache, T, offset)  # (B, heads, T, v)
        else:  # each row over its own cache, as that sequence alone would
            out = torch.cat([self._attend(q_nope[b : b + 1], q_pe[b : b + 1], latent[b : b + 1], c, T, start)
                             for b, (c, start) in enumerate(zip(rows.rows, rows.starts))])
        return self.o(out.transpose(1, 2).reshape(B, T, s.heads * s.v_dim))  # (B, T, H)

    def _attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, cache: MLACache | None,
                T: int, offset: int) -> torch.Tensor:
        """Append latent (B, T, R+P) to the cache and attend by the cheaper path: (B, heads, T, v)."""
        if cache is not None:
            latent = cache.update(latent)  # (B, S, R+P), S = offset + T
        S = latent.shape[1]
        absorb = self.absorb if self.absorb is not None else self._absorb_cheaper(T, S)
        return (self._absorbed if absorb else self._expanded)(q_nope, q_pe, latent, offset)

    def _absorb_cheaper(self, T: int, S: int) -> bool:
        """Multiply-adds per head of each path for T queries over S positions."""
        s = self.spec
        R, up = s.kv_lora_rank, s.nope_dim + s.v_dim
        expanded = S * R * up + T * S * (s.nope_dim + s.rope_dim + s.v_dim)
        absorbed = T * R * up + T * S * (2 * R + s.rope_dim)
        return absorbed < expanded

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, offset: int) -> torch.Tensor:
        s = self.spec
        B, S, _ = latent.shape
        T = q_nope.shape[2]
        c, k_pe = latent.split([s.kv_lora_rank, s.rope_dim], dim=-1)  # (B, S, R), (B, S, P)
        kv = self.kv_b(c).view(B, S, s.heads, s.nope_dim + s.v_dim).transpose(1, 2)  # (B, heads, S, nope+v)
        k_nope, v = kv.split([s.nope_dim, s.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, s.heads, S, s.rope_dim)], dim=-1)  # (B, heads, S, qk)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, heads, T, qk)
        mask = None if T == 1 or offset == 0 else _causal(T, offset, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=s.scale)  # (B, heads, T, v)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, offset: int) -> torch.Tensor:
        s = self.spec
        B, heads, T, _ = q_nope.shape
        w = self.kv_b.weight.view(heads, s.nope_dim + s.v_dim, s.kv_lora_rank)  # (heads, nope+v, R)
        q_lat = torch.matmul(q_nope, w[:, : s.nope_dim])  # (B, heads, T, R): q_nope . k_nope == q_lat . c
        # Every head attends to the same latent keys: fold heads into query rows (row h*T + t),
        # one single-head attention instead of a grouped one that would repeat the cache.
        q = torch.cat([q_lat, q_pe], dim=-1).reshape(B, 1, heads * T, s.kv_lora_rank + s.rope_dim)
        k = latent.unsqueeze(1)  # (B, 1, S, R+P)
        v = k[..., : s.kv_lora_rank]  # (B, 1, S, R): the values are the latents themselves
        mask = None if T == 1 else _causal(T, offset, q.device).repeat(heads, 1)  # (heads*T, S)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale)  # (B, 1, heads*T, R)
        o = o.reshape(B, heads, T, s.kv_lora_rank)  # (B, heads, T, R)
        return torch.matmul(o, w[:, s.nope_dim :].transpose(1, 2))  # (B, heads, T, v): W_uv after attention


def _causal(T: int, offset: int, device) -> torch.Tensor:
    """(T, offset+T) mask: query t (at position offset+t) sees positions <= its own."""
    q_pos = torch.arange(offset, offset + T, device=device)[:, None]
    return torch.arange(offset + T, device=device)[None, :] <= q_pos


def softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under scaled RoPE with
    mscale_all_dim (YaRN DeepSeek checkpoints: the RoPE tables carry the rest)."""
    scale = qk_head_dim ** -0.5
    m = scaling.get("mscale_all_dim") if scaling is not None else None
    if m and scaling["factor"] > 1:
        scale *= (0.1 * m * math.log(scaling["factor"]) + 1.0) ** 2
    return scale


# ----------------------------------------------------------------------------- config


@dataclass
class MLAArgs(BaseModelArgs):
    """Fields every MLA family has; each family sets transformers' defaults and its router."""

    intermediate_size: int = 11008  # dense layers
    moe_intermediate_size: int = 1407  # one routed expert
    n_routed_experts: int = 64
    n_shared_experts: int = 2  # always-on experts, n_shared_experts * moe_intermediate_size wide
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    first_k_dense_replace: int = 0
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False

    ZERO_OK = BaseModelArgs.ZERO_OK | {"n_shared_experts", "first_k_dense_replace"}
    LIMITS = {**BaseModelArgs.LIMITS, "n_routed_experts": 4096, "n_shared_experts": 256, "q_lora_rank": 1 << 16,
              "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 4096, "qk_rope_head_dim": 4096, "v_head_dim": 4096,
              "first_k_dense_replace": 1024, "n_group": 4096, "topk_group": 4096}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "MLAArgs":
        # partial_rotary_factor lives in rope_parameters (or the legacy top level); MLA
        # rotates all of qk_rope_head_dim, as transformers' attention does.
        for where, block in (("", config), ("rope_parameters.", config.get("rope_parameters")),
                             ("rope_scaling.", config.get("rope_scaling"))):
            if isinstance(block, dict) and block.get("partial_rotary_factor", 1.0) not in (1, 1.0):
                raise ModelLoadError(f"{source}: {where}partial_rotary_factor "
                                     f"{block['partial_rotary_factor']!r} is not supported by MLA (only 1.0)")
        return super().from_dict(config, source)

    def __post_init__(self):
        self.head_dim = self.qk_rope_head_dim  # what RoPE rotates; transformers sets it so too

    def validate(self, source: str) -> None:
        if self.qk_rope_head_dim % 2:
            raise ModelLoadError(f"{source}: qk_rope_head_dim must be even (RoPE rotates pairs), "
                                 f"got {self.qk_rope_head_dim}")
        # kv_b gives every query head its own key and value: there are no K/V head groups.
        if self.num_key_value_heads < self.num_attention_heads:
            raise ModelLoadError(
                f"{source}: num_key_value_heads ({self.num_key_value_heads}) below num_attention_heads "
                f"({self.num_attention_heads}) is not supported by multi-head latent attention")
        self.num_key_value_heads = self.num_attention_heads
        if self.moe_layers() and self.num_experts_per_tok is None:
            raise ModelLoadError(f"{source}: num_experts_per_tok is required for MoE layers")
        super().validate(source)

    @property
    def experts_per_layer(self) -> int:
        return self.n_routed_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok or 0

    @property
    def expert_dim(self) -> int:
        return self.moe_intermediate_size


def build_mla(args: MLAArgs, router: Callable[[MLAArgs], Router], interleaved: bool) -> Transformer:
    """The decoder stack: MLA on every layer, dense MLPs or MoE blocks by
    `args.moe_layers()`; `router(args)` makes each MoE layer's router."""
    rope = RoPE(args.qk_rope_head_dim, args.rope_theta, args.rope_scaling, interleaved=interleaved)
    spec = MLASpec(
        hidden=args.hidden_size, heads=args.num_attention_heads, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, nope_dim=args.qk_nope_head_dim, rope_dim=args.qk_rope_head_dim,
        v_dim=args.v_head_dim, scale=softmax_scale(args.qk_nope_head_dim + args.qk_rope_head_dim, args.rope_scaling),
        bias=args.attention_bias,
    )
    moe = set(args.moe_layers())
    layers = []
    for i in range(args.num_hidden_layers):
        if i in moe:
            width = args.n_shared_experts * args.moe_intermediate_size
            shared = MLP(args.hidden_size, width, args.hidden_act) if width else None
            mlp = MoEBlock(i, router(args), shared=shared)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(MLAttention(spec, rope), mlp, args.hidden_size, args.rms_norm_eps))
    return Transformer(args, layers)


# Checkpoint names of the MLA projections, shared experts and router bias (family rules
# go before the common ones, which cover q_proj, o_proj, norms, MLPs, gate and experts).
MLA_RULES: list[tuple[str, str]] = [
    (r"model\.layers\.(\d+)\.self_attn\.(q_a|kv_a)_proj(?:_with_mqa)?\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_a|kv_a)_layernorm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_b|kv_b)_proj\.weight", r"layers.\1.attn.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.shared.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"layers.\1.mlp.router.e_score_correction_bias"),
]


def make_mla_sanitizer(skip_mtp: bool = False) -> Callable[..., list[tuple[str, torch.Tensor]]]:
    """sanitize(name, tensor, args) for an MLA checkpoint. With `skip_mtp`, the
    multi-token-prediction layers stored after the decoder (model.layers.<N> for N >=
    num_hidden_layers) are skipped (they only draft tokens; transformers skips them too),
    and the zero-element shared-expert matrices of n_shared_experts 0 always."""
    rename = make_sanitizer(MLA_RULES)

    def sanitize(name: str, tensor: torch.Tensor, args=None) -> list[tuple[str, torch.Tensor]]:
        if skip_mtp and args is not None and past_last_layer(name, args):
            return []
        if ".shared_experts." in name and tensor.numel() == 0:
            return []
        return rename(name, tensor)

    return sanitize
