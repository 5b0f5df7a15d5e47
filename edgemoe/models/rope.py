"""Rotary position embeddings: the frequency tables for every rope_type the families
use (default, linear, llama3, yarn, Hunyuan's ntk_alpha) and their application to q and
k; `LongRoPE` switches between a short and a long table by sequence length."""

from __future__ import annotations

import math

import torch



def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale for a rope configuration."""
    # Explicit device: models are built under torch.device("meta") before weights load.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv, 1.0
    kind, factor = scaling["rope_type"], scaling.get("factor")
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "ntk_alpha":
        # Hunyuan's NTK-alpha (labelled "dynamic" with an `alpha` in its configs): a fixed
        # alpha stretches the base once, so unlike dynamic NTK the table is static.
        base = theta * scaling["alpha"] ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)), 1.0
    # yarn: blend interpolated and extrapolated frequencies over a ramp of dimensions.
    old_ctx = scaling["original_max_position_embeddings"]

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (inv / factor) * (1 - extrapolate) + inv * extrapolate, float(attn)


class RoPE:
    """Rotary position embedding in the half-rotation layout used by HF checkpoints.
    cos/sin tables are built once and grown on demand.

    `dim` is the number of leading channels rotated: a head wider than `dim` keeps its
    other channels as they are (partial rotary, GLM-4.5). With `interleaved` the rotated
    channels come as pairs (x0, x1), (x2, x3), ... (DeepSeek, ERNIE): they are reordered
    to the half layout (evens, then odds) first, as transformers does, which changes no
    dot product between a rotated q and k."""

    def __init__(self, dim: int, theta: float, scaling: dict | None, interleaved: bool = False):
        self.dim, self.interleaved = dim, interleaved
        self.inv_freq, self.scale = rope_frequencies(dim, theta, scaling)
        self._cos = self._sin = torch.empty(0, device="cpu")

    def tables(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < end or self._cos.dtype != dtype:
            n = max(end, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)  # (n, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (n, D)
            self._cos = (emb.cos() * self.scale).to(dtype)
            self._sin = (emb.sin() * self.scale).to(dtype)
        return self._cos, self._sin

    def __call__(self, q: torch.Tensor, k: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[2]
        cos, sin = self.tables(offset + T, q.dtype)
        cos, sin = cos[offset : offset + T], sin[offset : offset + T]  # (T, D)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first `dim` channels of x (..., T, >= dim) by tables (T, dim)."""
        if x.shape[-1] > self.dim:
            return torch.cat([self.apply(x[..., : self.dim], cos, sin), x[..., self.dim :]], dim=-1)
        if self.interleaved:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)  # pairs -> half layout
        return _rotate(x, cos, sin)


def longrope_inv_freq(dim: int, theta: float, factors: list[float]) -> torch.Tensor:
    """LongRoPE inverse frequencies (dim/2,): each default frequency divided by its own
    rescale factor (one of a checkpoint's `short_factor` / `long_factor` lists)."""
    ext = torch.tensor(factors, dtype=torch.float32, device="cpu")  # (dim/2,)
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))


class LongRoPE:
    """LongRoPE (Phi-3, Phi-3.5-MoE): a table for short contexts and one for long ones,
    each with its own inverse frequencies and cos/sin scale.

    As transformers decides once per forward from max(position_ids) + 1, a call whose
    last position is past `original_max` (offset + T > original_max) rotates all of its
    tokens with the long table, any other call with the short one. Keys already in the
    KV cache keep the table they were rotated with: cached decoding that crosses
    original_max mixes the two tables (as transformers' forward with a cache does),
    while one forward over the same tokens uses the long table for every position, so
    the two differ past that point; chunked prefill and prompt-prefix reuse inherit
    this. transformers' `generate` avoids the mix by dropping its cache at the first
    step past original_max and recomputing the whole sequence; edgemoe's generation
    does not, so it follows transformers' `generate` only until then (or throughout
    when both tables are equal)."""

    def __init__(self, dim: int, theta: float, short: tuple[list[float], float], long: tuple[list[float], float],
                 original_max: int):
        self.dim, self.interleaved, self.original_max = dim, False, original_max
        self.short, self.long = RoPE(dim, theta, None), RoPE(dim, theta, None)
        for table, (factors, scale) in ((self.short, short), (self.long, long)):
            table.inv_freq, table.scale = longrope_inv_freq(dim, theta, factors), float(scale)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.long if offset + q.shape[2] > self.original_max else self.short
        return table(q, k, offset)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def temperature_scales(offset: int, T: int, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Query scales (T,) for positions offset..offset+T-1: long contexts sharpen the
    attention of layers without RoPE (Llama 4, arXiv 2501.19399)."""
    pos = torch.arange(offset, offset + T, dtype=torch.float32, device="cpu")  # (T,)
    return torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
