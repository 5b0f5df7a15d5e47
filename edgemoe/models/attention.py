"""Attention kinds and their KV caches.

`Attention` is multi-head attention with grouped K/V heads (MHA/GQA) and the options the
families need (biases, q/k norms, clip_qkv, sliding windows). A family picks its
options through an `AttentionSpec`; each attention module also says how its cache is
made and how many bytes one position of it takes, so that the budget sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import Linear
from ..errors import ContextLengthError
from .norms import RMSNorm
from .rope import RoPE



class KVCache:
    """Keys and values of one attention layer.

    With a `capacity` (the context size) the buffers are allocated once, at the first
    update, for every position, so that the budget can count them and no step allocates;
    untouched pages cost no RSS until used. A step past the capacity raises
    ContextLengthError instead of running positions the cache has no room for. Without a
    capacity (reference checks, perplexity windows) the buffers grow in steps."""

    STEP = 256

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.offset = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape  # (B, KV, T, D)
        end = self.offset + T
        if self.capacity is not None and end > self.capacity:
            raise ContextLengthError(
                f"the context is full: {end} tokens do not fit the context size of {self.capacity} "
                "(--ctx-size / ctx_size)")
        if self.k is None or end > self.k.shape[2]:
            cap = self.capacity or (end + self.STEP - 1) // self.STEP * self.STEP
            new_k = k.new_empty(B, H, cap, D)
            new_v = v.new_empty(B, H, cap, v.shape[-1])
            if self.k is not None:
                new_k[:, :, : self.offset] = self.k[:, :, : self.offset]
                new_v[:, :, : self.offset] = self.v[:, :, : self.offset]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.offset : end] = k
        self.v[:, :, self.offset : end] = v
        self.offset = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def trim(self, n: int) -> None:
        """Forget the last n positions (used to reuse a prompt prefix)."""
        self.offset = max(0, self.offset - n)


@dataclass
class AttentionSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (per head, Qwen3) or "full" (whole projection, OLMoE)
    norm_eps: float = 1e-6
    clip_qkv: float | None = None
    sliding_window: int | None = None


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, rope: RoPE):
        super().__init__()
        s = self.spec = spec
        self.q = Linear(s.hidden, s.heads * s.head_dim, bias=s.qkv_bias)
        self.k = Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v = Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o = Linear(s.heads * s.head_dim, s.hidden, bias=s.o_bias)
        if s.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(s.head_dim, s.norm_eps), RMSNorm(s.head_dim, s.norm_eps)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(s.heads * s.head_dim, s.norm_eps)
            self.k_norm = RMSNorm(s.kv_heads * s.head_dim, s.norm_eps)
        self.rope = rope

    def make_cache(self, capacity: int | None) -> KVCache:
        return KVCache(capacity)

    def kv_bytes_per_token(self, elem: int) -> int:
        """Bytes one cached position takes (keys and values) at `elem` bytes per value."""
        return 2 * self.spec.kv_heads * self.spec.head_dim * elem

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape  # (B, T, H)
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, heads*D), (B, T, kv*D) x2
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, s.heads, s.head_dim)
        k = k.view(B, T, s.kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, D), (B, kv, T, D)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)  # (B, kv, T, D)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, k, offset)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, kv, offset+T, D)
        mask, causal = self._mask(T, offset, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=s.heads != s.kv_heads
        )  # (B, heads, T, D)
        return self.o(out.transpose(1, 2).reshape(B, T, s.heads * s.head_dim))

    def _mask(self, T: int, offset: int, device) -> tuple[torch.Tensor | None, bool]:
        window = self.spec.sliding_window
        total = offset + T
        if (window is None or total <= window) and (T == 1 or offset == 0):
            return None, T > 1
        q_pos = torch.arange(offset, total, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(total, device=device)[None, :]  # (1, offset+T)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        return allowed, False
