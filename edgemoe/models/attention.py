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
from ..fastops import AttnHalfArgs, attend_one, attn_half, kernel_key
from .norms import RMSNorm
from .rope import RoPE
from .rope import temperature_scales  # noqa: F401 (also imported from here)
from .rows import RowCaches



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
        end = self._room(k, v)
        self.k[:, :, self.offset : end] = k
        self.v[:, :, self.offset : end] = v
        self.offset = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor | None:
        """Append one position (k, v (1, KV, 1, D)) and attend with q (1, heads, 1, D) over
        the whole cache in one C call (fastops.attend_one): (1, heads, 1, Dv), or None,
        with nothing appended, when the kernel cannot take it."""
        end = self._room(k, v)
        out = attend_one(q, k, v, self.k, self.v, self.offset, scale)
        if out is not None:
            self.offset = end
        return out

    def _room(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Make the buffers hold positions up to offset + T; returns that end."""
        B, H, T, D = k.shape  # (B, KV, T, D)
        return self.room(B, H, T, D, v.shape[-1], k.dtype)

    def room(self, B: int, H: int, T: int, D: int, Dv: int, dtype: torch.dtype) -> int:
        """Make the buffers (B, H, capacity, D / Dv) of `dtype` hold positions up to
        offset + T; returns that end."""
        end = self.offset + T
        if self.capacity is not None and end > self.capacity:
            raise ContextLengthError(
                f"the context is full: {end} tokens do not fit the context size of {self.capacity} "
                "(--ctx-size / ctx_size)")
        if self.k is None or end > self.k.shape[2]:
            cap = self.capacity or (end + self.STEP - 1) // self.STEP * self.STEP
            new_k = torch.empty(B, H, cap, D, dtype=dtype)
            new_v = torch.empty(B, H, cap, Dv, dtype=dtype)
            if self.k is not None:
                new_k[:, :, : self.offset] = self.k[:, :, : self.offset]
                new_v[:, :, : self.offset] = self.v[:, :, : self.offset]
            self.k, self.v = new_k, new_v
        return end

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
    use_rope: bool = True  # False: no rotary embedding on this layer (NoPE; EXAONE-MoE/AFMoE global layers)
    output_gate: bool = False  # out * sigmoid(gate(x)) before o, gate a separate projection (AFMoE)
    fused_qkv: bool = False  # one `qkv` projection with rows [q | k | v] (Sarvam-MoE's query_key_value)
    scale: float | None = None  # softmax scale of q.k; None: 1/sqrt(head_dim) (Granite: attention_multiplier)
    # qk_norm "l2" (Llama 4): weightless RMS norm of each q/k head, applied after RoPE.
    chunk: int | None = None  # chunked local attention: a token sees only its own block of `chunk` positions (Llama 4)
    # (floor_scale, attn_scale): q at position p scaled by 1 + attn_scale * log1p(floor((p + 1) / floor_scale))
    # (Llama 4's attention temperature tuning on its NoPE layers).
    temperature: tuple[float, float] | None = None
    # gpt-oss: a learned logit per head (`sinks`) joins each query's softmax and takes its share
    # of the probability mass without contributing a value.
    sinks: bool = False
    # qk_norm "head" applied after RoPE instead of before it (Hunyuan-A13B).
    qk_norm_after_rope: bool = False
    # Qwen3-Next: the q projection's rows hold, head by head, the query then an output gate;
    # the attention output is multiplied by sigmoid(gate) before o.
    query_gate: bool = False


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, rope: RoPE):
        super().__init__()
        s = self.spec = spec
        if s.fused_qkv:
            self.qkv = Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=s.qkv_bias)
        else:
            self.q = Linear(s.hidden, s.heads * s.head_dim * (2 if s.query_gate else 1), bias=s.qkv_bias)
            self.k = Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
            self.v = Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o = Linear(s.heads * s.head_dim, s.hidden, bias=s.o_bias)
        if s.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(s.head_dim, s.norm_eps), RMSNorm(s.head_dim, s.norm_eps)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(s.heads * s.head_dim, s.norm_eps)
            self.k_norm = RMSNorm(s.kv_heads * s.head_dim, s.norm_eps)
        if s.output_gate:
            self.gate = Linear(s.hidden, s.heads * s.head_dim, bias=False)
        self.rope = rope
        if s.sinks:
            self.sinks = nn.Parameter(torch.empty(s.heads))
        self._half: bool | None = None  # decode_half: whether this layer's options qualify (decided once)

    def make_cache(self, capacity: int | None) -> KVCache:
        return KVCache(capacity)

    def decode_half(self, x: torch.Tensor, norm: nn.Module, cache) -> torch.Tensor | None:
        """x + self(norm(x), cache) for one position of one sequence (x (1, 1, H)) in one C
        call (fastops.attn_half), or None when this layer or call does not qualify: a plain
        RMSNorm, GQA with standard RoPE and nothing else of the spec's options, q/k/v/o on
        the int4/int8 kernels without biases, a plain KV cache of x's dtype. Its results are
        those of the module-by-module path, bit for bit."""
        if self._half is None:
            s = self.spec
            plain = not (s.fused_qkv or s.query_gate or s.qk_norm or s.clip_qkv is not None or s.sliding_window
                         or s.chunk or s.temperature is not None or s.sinks or s.output_gate or s.qkv_bias or s.o_bias)
            rope = self.rope
            self._half = bool(plain and s.use_rope and type(rope) is RoPE and rope.dim == s.head_dim
                              and not rope.interleaved and s.heads % s.kv_heads == 0)
            self._half_args, self._half_key, self._half_mats = AttnHalfArgs(), None, None
        if not self._half or type(cache) is not KVCache or type(norm) is not RMSNorm or norm.weight.dtype != x.dtype:
            return None
        # The descriptions' key, built from the module and buffer dicts (not nn.Module's
        # attribute look-up, which was a tenth of a decode step's Python time).
        mq = self._modules
        q, k, v, o = mq["q"], mq["k"], mq["v"], mq["o"]
        key = (kernel_key(), q, k, v, o, _codes_ptr(q), _codes_ptr(k), _codes_ptr(v), _codes_ptr(o))
        if key != self._half_key:  # the descriptions, made again only when a setting or a weight changed
            descs = tuple(getattr(m, "decode_desc", lambda: None)() for m in (q, k, v, o))
            self._half_key, self._half_mats = key, None if None in descs else self._half_args.get(descs)
        if self._half_mats is None or not x.is_contiguous():
            return None
        s = self.spec
        pos = cache.offset
        if cache.k is not None and (cache.k.dtype != x.dtype or cache.k.shape[0] != 1):
            return None
        cache.room(1, s.kv_heads, 1, s.head_dim, s.head_dim, x.dtype)
        cos, sin = self.rope.tables(pos + 1, x.dtype)  # (n, D) each
        out = attn_half(x, norm.weight, norm.eps, self._half_mats, s.heads, s.kv_heads, s.head_dim,
                        cos[pos], sin[pos], cache.k, cache.v, pos, s.scale)
        if out is not None:
            cache.offset = pos + 1
        return out

    def kv_bytes_per_token(self, elem: int) -> int:
        """Bytes one cached position takes (keys and values) at `elem` bytes per value."""
        return 2 * self.spec.kv_heads * self.spec.head_dim * elem

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape  # (B, T, H)
        if s.fused_qkv:
            kv = s.kv_heads * s.head_dim
            q, k, v = self.qkv(x).split([s.heads * s.head_dim, kv, kv], dim=-1)  # (B, T, heads*D), (B, T, kv*D) x2
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, heads*D), (B, T, kv*D) x2
        if s.query_gate:
            q, qgate = q.view(B, T, s.heads, 2, s.head_dim).unbind(3)  # (B, T, heads, D) x2
            q, qgate = q.reshape(B, T, -1), qgate.reshape(B, T, -1)  # (B, T, heads*D) x2
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, s.heads, s.head_dim)
        k = k.view(B, T, s.kv_heads, s.head_dim)
        if s.qk_norm == "head" and not s.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, D), (B, kv, T, D)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)  # (B, kv, T, D)
        rows = cache if isinstance(cache, RowCaches) else None  # sequences at their own positions (models/rows.py)
        offset = cache.offset if cache is not None and rows is None else 0
        if s.use_rope:
            q, k = self.rope(q, k, offset) if rows is None else rows.rope(self.rope, q, k)
        if s.qk_norm == "head" and s.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, heads, T, D), (B, kv, T, D)
        if s.qk_norm == "l2":
            q, k = l2_norm(q, s.norm_eps), l2_norm(k, s.norm_eps)
        if s.temperature is not None:
            if rows is None:
                scales = temperature_scales(offset, T, *s.temperature).to(q.device)[:, None]  # (T, 1) fp32
            else:
                scales = rows.temperature(T, s.temperature)  # (B, 1, T, 1) fp32
            q = (q * scales).to(q.dtype)  # (B, heads, T, D)
        if rows is None:
            out = self._attend(q, k, v, cache, T, offset)  # (B, heads, T, D)
        else:  # each row over its own cache, as that sequence alone would (no padding, no mask of rows)
            out = torch.cat([self._attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], c, T, start)
                             for b, (c, start) in enumerate(zip(rows.rows, rows.starts))])
        out = out.transpose(1, 2).reshape(B, T, s.heads * s.head_dim)  # (B, T, heads*D)
        if s.output_gate:
            out = out * torch.sigmoid(self.gate(x))
        if s.query_gate:
            out = out * torch.sigmoid(qgate)
        return self.o(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, T: int,
                offset: int) -> torch.Tensor:
        """Append k, v (B, kv, T, D) to the cache and attend with q (B, heads, T, D): (B, heads, T, D).
        One position over a plain KV cache is one C call (KVCache.attend_one)."""
        s = self.spec
        mask, causal = self._mask(T, offset, q.device)
        if T == 1 and mask is None and type(cache) is KVCache and not s.sinks:
            out = cache.attend_one(q, k, v, s.scale)  # (1, heads, 1, D); None: not taken, nothing appended
            if out is not None:
                return out
        if cache is not None:
            k, v = cache.update(k, v)  # (B, kv, offset+T, D)
        if s.sinks:
            q, k, v, mask, causal = add_sink(q, k, v, mask, causal, self.sinks, s.scale)
        if T == 1 and (mask is None or mask.dtype == torch.bool):
            return decode_attention(q, k, v, mask, s.scale)  # (B, heads, 1, D)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=s.heads != s.kv_heads,
            scale=s.scale,
        )  # (B, heads, T, D)

    def _mask(self, T: int, offset: int, device) -> tuple[torch.Tensor | None, bool]:
        window = self.spec.sliding_window
        chunk = self.spec.chunk
        total = offset + T
        if (window is None or total <= window) and (chunk is None or total <= chunk) and (T == 1 or offset == 0):
            return None, T > 1
        q_pos = torch.arange(offset, total, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(total, device=device)[None, :]  # (1, offset+T)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        if chunk is not None:
            allowed &= k_pos // chunk == q_pos // chunk
        return allowed, False


def _codes_ptr(m: nn.Module) -> int:
    """Where a quantized linear layer's codes are (0: not one), to notice replaced weights."""
    w = m._buffers.get("qweight")
    return 0 if w is None else w.data_ptr()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None) -> torch.Tensor:
    """Attention of one query position, q (B, heads, 1, D), over k, v (B, kv, S, D) with
    query head h reading K/V head h // (heads / kv) (SDPA's enable_gqa), in fp32; `mask`
    (1, S) bool marks the keys it may see. torch's CPU SDPA kernel takes 5-10x as long for
    one position (140 us at S = 100, 690 us at 500 against 55 and 100 us here, two Zen 5
    cores: edgemoe_lab/results/decode_ops.md), and a decode step calls it once per layer."""
    B, H, _, D = q.shape
    kv = k.shape[1]
    qg = q.reshape(B, kv, H // kv, D).float()  # (B, kv, g, D)
    scores = torch.matmul(qg, k.float().transpose(-1, -2))  # (B, kv, g, S)
    scores.mul_(scale if scale is not None else D**-0.5)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, kv, g, S)
    return torch.matmul(p, v.float()).to(q.dtype).view(B, H, 1, v.shape[-1])  # (B, heads, 1, Dv)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last dimension, in fp32 (Llama 4's q/k norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
             sinks: torch.Tensor, scale: float | None):
    """Attention sinks (gpt-oss) as one more key that every query may attend to: softmax
    over [q.k * scale, sink_h] with the sink's column then dropped is attention over the
    keys plus a zero-valued key whose logit is sink_h. The sink logit rides on a spare
    channel: q gets sink_h / scale, real keys 0 and the sink key 1, so the SDPA kernel
    (whose scale is then given explicitly) computes it. Returns the extended (q, k, v,
    mask, causal) for scaled_dot_product_attention."""
    B, H, T, D = q.shape  # (B, heads, T, D)
    S = k.shape[2]
    want = scale if scale is not None else D**-0.5
    used = scale if scale is not None else (D + 1) ** -0.5  # SDPA's default for D + 1 channels
    if used != want:
        q = q * (want / used)
    sink = (sinks.to(q.dtype) / used).view(1, H, 1, 1).expand(B, H, T, 1)  # (1->B, heads, T, 1)
    q = torch.cat([q, sink], dim=-1)  # (B, heads, T, D+1)
    key = k.new_zeros(B, k.shape[1], 1, D + 1)  # (B, kv, 1, D+1)
    key[..., D] = 1
    k = torch.cat([torch.cat([k, k.new_zeros(B, k.shape[1], S, 1)], dim=-1), key], dim=2)  # (B, kv, S+1, D+1)
    v = torch.cat([v, v.new_zeros(B, v.shape[1], 1, v.shape[-1])], dim=2)  # (B, kv, S+1, Dv)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
        if causal:  # no cache offset: query i sees keys 0..i
            mask = mask.tril()
    mask = torch.cat([mask, mask.new_ones(T, 1)], dim=-1)  # (T, S+1): the sink is always visible
    return q, k, v, mask, False
