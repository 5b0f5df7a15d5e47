"""Blocks only Gemma 4 uses: its norms, proportional RoPE, attention with value norms
and shared key/value projections, the scaled router, the MoE block that routes on the
residual stream, and the decoder layer that runs a dense MLP next to the experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import linear
from .attention import Attention, AttentionSpec, KVCache
from .base import MLP
from .moe import MoEBlock
from .norms import RMSNorm
from .rope import RoPE
from .routers import Router


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last dimension, computed in fp32 (Gemma's v_norm and
    router norm)."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


class GemmaNorm(RMSNorm):
    """RMSNorm as Gemma computes it: the weight multiplies in fp32, before the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (xf * self.weight.float()).to(x.dtype)


class ProportionalRoPE(RoPE):
    """Gemma 4's "proportional" RoPE on heads of `head_dim` channels: the first
    int(fraction * head_dim / 2) frequencies are theta^(-2i/head_dim) (the exponent over
    the whole head, not the rotated part), the rest are 0 and leave their channel pairs
    unrotated; all are divided by `factor`. Pairs are (i, i + head_dim/2) as in RoPE."""

    def __init__(self, head_dim: int, theta: float, fraction: float, factor: float = 1.0):
        super().__init__(head_dim, theta, None)
        n = int(fraction * head_dim // 2)
        rotated = 1.0 / theta ** (torch.arange(0, 2 * n, 2, dtype=torch.float32, device="cpu") / head_dim)
        self.inv_freq = torch.cat([rotated, torch.zeros(head_dim // 2 - n, device="cpu")]) / factor  # (D/2,)


class Gemma4Attention(Attention):
    """Per-head q/k RMSNorm (with weights) and a weightless RMS norm on the value heads;
    q.k is not scaled (the norms fix its size). With `k_eq_v` (global layers of the
    large models) there is no v projection: the values are the key projection's output,
    normed as values."""

    def __init__(self, spec: AttentionSpec, rope: RoPE, k_eq_v: bool):
        super().__init__(spec, rope)
        self.k_eq_v = k_eq_v
        if k_eq_v:
            del self.v
        self.q_norm = GemmaNorm(spec.head_dim, spec.norm_eps)
        self.k_norm = GemmaNorm(spec.head_dim, spec.norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape  # (B, T, H)
        q = self.q_norm(self.q(x).view(B, T, s.heads, s.head_dim)).transpose(1, 2)  # (B, heads, T, D)
        k = self.k(x).view(B, T, s.kv_heads, s.head_dim)  # (B, T, kv, D)
        v = k if self.k_eq_v else self.v(x).view(B, T, s.kv_heads, s.head_dim)  # (B, T, kv, D)
        k = self.k_norm(k).transpose(1, 2)  # (B, kv, T, D)
        v = rms(v, s.norm_eps).transpose(1, 2)  # (B, kv, T, D)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, k, offset)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, kv, offset+T, D)
        mask, causal = self._mask(T, offset, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=s.heads != s.kv_heads, scale=s.scale,
        )  # (B, heads, T, D)
        return self.o(out.transpose(1, 2).reshape(B, T, s.heads * s.head_dim))


class Gemma4Router(Router):
    """Gemma 4's router: the gate sees rms(x) * scale / sqrt(hidden) (a weightless norm,
    then a learned per-channel `scale`); softmax over all experts, top k, renormalised;
    then each chosen weight is multiplied by its expert's learned `per_expert_scale`."""

    kind = "gemma4"

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__(hidden, num_experts, top_k, norm_topk=True)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))
        self.eps = eps
        self.root = hidden**-0.5

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms(x, self.eps) * self.scale * self.root  # (N, H)
        return self.mask(linear(h, self.weight))  # (N, E)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, ids, logits = super().forward(x)  # (N, k) renormalised, (N, k), (N, E)
        scale = self.per_expert_scale[ids.clamp_min(0)]  # (N, k); a dropped slot (-1) has weight 0
        return (weights * scale).to(x.dtype), ids, logits


class Gemma4MoE(MoEBlock):
    """Routes on its input (the residual stream) and runs the experts on
    `norm(input)` (pre_feedforward_layernorm_2). The provider is told the block's input,
    the one routers see, so the gate look-ahead scores what a later router would."""

    def __init__(self, layer: int, router: Gemma4Router, hidden: int, eps: float):
        super().__init__(layer, router)
        self.norm = GemmaNorm(hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, ids, logits = self.router(x)  # (N, k), (N, k), (N, E)
        if self.hook is not None:
            self.hook(self.layer, ids, weights, logits)
        return self.routed(self.norm(x), weights, ids, route_x=x).reshape(shape)  # (..., H)


class Gemma4Layer(nn.Module):
    """Sandwich-normed block with a dense MLP and the experts side by side:

        x = x + post_attn_norm(attn(attn_norm(x)))
        y = post_dense_norm(dense(mlp_norm(x))) + post_moe_norm(mlp(x))
        x = (x + post_mlp_norm(y)) * layer_scalar

    `mlp` is the MoE block (the name the runtime looks for)."""

    def __init__(self, attn: Gemma4Attention, dense: MLP, moe: Gemma4MoE, hidden: int, eps: float):
        super().__init__()
        self.attn, self.dense, self.mlp = attn, dense, moe
        for name in ("attn_norm", "post_attn_norm", "mlp_norm", "post_dense_norm", "post_moe_norm", "post_mlp_norm"):
            setattr(self, name, GemmaNorm(hidden, eps))
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cache))  # (B, T, H)
        y = self.post_dense_norm(self.dense(self.mlp_norm(x))) + self.post_moe_norm(self.mlp(x))  # (B, T, H)
        return (x + self.post_mlp_norm(y)) * self.layer_scalar
