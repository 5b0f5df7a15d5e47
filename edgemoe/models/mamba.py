"""Mamba selective-scan token mixers: `Mamba` (Mamba-1 as Jamba has it, with RMS norms on
dt, B and C) and `Mamba2` (the Mamba-2 / SSD mixer of Bamba and Granite 4.0-H). Both sit in
a decoder layer's `attn` slot and keep a recurrent.StateCache: the last K-1 inputs of
their causal conv and the scan state, whose size does not depend on the context.

Scans run in fp32 (recurrent.wide) whatever the model dtype: the state accumulates over
the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import Linear, linear
from ..experts import ACTIVATIONS
from .norms import RMSNorm
from .recurrent import StateCache, causal_conv, wide


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   S: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's scan, fp32: inputs u and steps dt (B, T, I), A (I, N), Bm, Cm (B, T, N),
    state S (B, I, N). Per token: S = exp(dt A) S + dt B u, y = S C. The discretised
    exp(dt A) and dt B u are computed `chunk` tokens at a time (they are (B, L, I, N)), the
    recurrence one token at a time. Returns (y (B, T, I), final state)."""
    T = u.shape[1]
    y = torch.empty_like(u)  # (B, T, I)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        dA = torch.exp(dt[:, start:end, :, None] * A)  # (B, L, I, N)
        dBu = dt[:, start:end, :, None] * Bm[:, start:end, None, :] * u[:, start:end, :, None]  # (B, L, I, N)
        for t in range(end - start):
            S = dA[:, t] * S + dBu[:, t]  # (B, I, N)
            y[:, start + t] = (S @ Cm[:, start + t, :, None])[..., 0]  # (B, I)
    return y, S


class Mamba(nn.Module):
    """Mamba-1 (Jamba's variant). x -> in_proj -> (h, z), each `inner` wide; h -> causal
    conv + activation; x_proj(h) -> dt (rank R), B, C (N each), each RMS-normed; dt =
    softplus(dt_proj(dt)) per channel. Per channel i and state n the scan is
    s = exp(dt_i A_in) s + dt_i B_n h_i, y_i = sum_n C_n s_in + D_i h_i; then y * silu(z)
    goes through out_proj. The state s is (B, inner, N)."""

    CHUNK = 32  # positions whose discretised A and B x are materialised at once

    def __init__(self, hidden: int, inner: int, d_state: int, d_conv: int, dt_rank: int, conv_bias: bool,
                 proj_bias: bool, act: str, eps: float):
        super().__init__()
        self.inner, self.d_state, self.d_conv, self.dt_rank = inner, d_state, d_conv, dt_rank
        self.in_proj = Linear(hidden, 2 * inner, bias=proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(inner, 1, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(inner)) if conv_bias else None
        self.x_proj = Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = Linear(inner, hidden, bias=proj_bias)
        self.dt_norm, self.b_norm, self.c_norm = RMSNorm(dt_rank, eps), RMSNorm(d_state, eps), RMSNorm(d_state, eps)
        self.act = ACTIVATIONS[act]

    def make_cache(self, capacity: int | None) -> StateCache:
        return StateCache(capacity)

    def kv_bytes_per_token(self, elem: int) -> int:
        return 0

    def state_bytes(self, elem: int) -> int:
        """One sequence: the conv window (model dtype) and the fp32 scan state."""
        return self.inner * (self.d_conv - 1) * elem + self.inner * self.d_state * max(elem, 4)

    def forward(self, x: torch.Tensor, cache: StateCache | None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, H)
        if cache is not None:
            cache.check(T)
        h, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, I, T) x2
        h, conv = causal_conv(h, self.conv_weight, self.conv_bias, cache.conv if cache is not None else None)
        h = self.act(h).transpose(1, 2)  # (B, T, I)
        dt, Bm, Cm = self.x_proj(h).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        f = wide(x.dtype)
        dt, Bm, Cm = self.dt_norm(dt), self.b_norm(Bm).to(f), self.c_norm(Cm).to(f)  # (B, T, R), (B, T, N) x2
        # dt_proj's bias is added in fp32, after the matmul, as transformers does.
        dt = F.softplus(linear(dt, self.dt_proj.weight).to(f) + self.dt_proj.bias.to(f))  # (B, T, I)
        hf = h.to(f)  # (B, T, I)
        S = cache.state if cache is not None and cache.state is not None else \
            x.new_zeros(B, self.inner, self.d_state, dtype=f)  # (B, I, N)
        y, S = selective_scan(hf, dt, -torch.exp(self.A_log.to(f)), Bm, Cm, S, self.CHUNK)  # (B, T, I)
        if cache is not None:
            cache.update(conv, S, T)
        y = (y + hf * self.D.to(f)) * F.silu(z.transpose(1, 2).to(f))  # (B, T, I)
        return self.out_proj(y.to(x.dtype))  # (B, T, H)


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
             S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the Mamba-2 scan, fp32: x (B, h, p), dt (B, h), A (h,), Bm, Cm (B, G, n)
    shared by the h/G consecutive heads of each group, S (B, h, p, n). S decays by
    exp(dt A) per head and adds dt x B^T; y = S C."""
    Bsz, h, p = x.shape
    G, n = Bm.shape[1:]
    S = S * torch.exp(dt * A)[..., None, None]  # (B, h, p, n)
    S = S + ((dt[..., None] * x).view(Bsz, G, h // G, p)[..., None] * Bm[:, :, None, None, :]).view(Bsz, h, p, n)
    y = torch.einsum("bgrpn,bgn->bgrp", S.view(Bsz, G, h // G, p, n), Cm)  # (B, G, h/G, p)
    return y.reshape(Bsz, h, p), S


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                S: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 scan over a sequence, `chunk` positions at a time (the SSD form): x
    (B, T, h, p), dt (B, T, h), A (h,), Bm, Cm (B, T, G, n) (each group's B and C shared by
    h/G consecutive heads), S (B, h, p, n), all fp32. Returns (y (B, T, h, p), final
    state); equal to T `ssd_step`s up to rounding.

    Within a chunk, with a_t = dt_t A and cumulative sums c_t, the state after t is
    exp(c_t) S0 + sum_{s<=t} exp(c_t - c_s) dt_s x_s B_s^T, so y_t = exp(c_t) S0 C_t +
    sum_{s<=t} exp(c_t - c_s) (C_t . B_s) dt_s x_s: an attention-like product with a decay
    mask, whose C.B scores are computed once per group, not per head."""
    Bsz, T, h, p = x.shape
    G, n = Bm.shape[2:]
    r = h // G
    Sg = S.view(Bsz, G, r, p, n)
    outs = []
    for start in range(0, T, chunk):
        xc, dtc = x[:, start:start + chunk], dt[:, start:start + chunk]  # (B, L, h, p), (B, L, h)
        Bc, Cc = Bm[:, start:start + chunk], Cm[:, start:start + chunk]  # (B, L, G, n)
        L = xc.shape[1]
        cum = (dtc * A).transpose(1, 2).cumsum(-1).view(Bsz, G, r, L)  # (B, G, r, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # (L, L) s <= t
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, G, r, L, L)
        xdt = (xc * dtc[..., None]).view(Bsz, L, G, r, p)  # (B, L, G, r, p)
        scores = torch.einsum("blgn,bsgn->bgls", Cc, Bc)[:, :, None] * decay  # (B, G, r, L, L)
        y = torch.einsum("bgrls,bsgrp->blgrp", scores, xdt)  # (B, L, G, r, p)
        from_state = torch.einsum("blgn,bgrpn->blgrp", Cc, Sg)  # (B, L, G, r, p)
        y = y + from_state * cum.exp().permute(0, 3, 1, 2)[..., None]  # (B, L, G, r, p)
        outs.append(y.reshape(Bsz, L, h, p))
        last = cum[..., -1:]  # (B, G, r, 1)
        to_end = (last - cum).exp()  # (B, G, r, L): decay from each position to the chunk end
        Sg = Sg * last.exp()[..., None] + torch.einsum("bsgn,bgrs,bsgrp->bgrpn", Bc, to_end, xdt)  # (B, G, r, p, n)
    return torch.cat(outs, dim=1), Sg.reshape(Bsz, h, p, n)


class GroupedGatedRMSNorm(nn.Module):
    """Mamba-2's output norm: x * silu(gate), then RMS-normed over each of the groups of
    `group` channels (fp32), times the weight."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group, self.eps = group, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        f = wide(x.dtype)
        xf = x.to(f) * F.silu(gate.to(f))  # (..., dim)
        g = xf.view(*xf.shape[:-1], -1, self.group)  # (..., groups, group)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(xf.shape).to(x.dtype)


class Mamba2(nn.Module):
    """Mamba-2 (Bamba / Granite 4.0-H). in_proj -> gate (inner), xBC (inner + 2 G N), dt
    (one per head); xBC -> causal conv + activation -> x (heads of `head_dim`), B, C (G
    groups of N, each shared by heads/G heads); dt = softplus(dt + dt_bias), clamped to
    `dt_limit`; one scalar decay A per head (ssd_step / ssd_chunked); y + D x, then a
    grouped RMS norm gated by silu(gate) and out_proj. The state is (B, heads, head_dim, N)."""

    def __init__(self, hidden: int, inner: int, heads: int, head_dim: int, groups: int, d_state: int, d_conv: int,
                 conv_bias: bool, proj_bias: bool, act: str, eps: float, dt_limit: tuple[float, float], chunk: int):
        super().__init__()
        self.inner, self.heads, self.head_dim, self.groups, self.d_state = inner, heads, head_dim, groups, d_state
        self.d_conv, self.dt_limit, self.chunk = d_conv, dt_limit, chunk
        conv_dim = inner + 2 * groups * d_state
        self.in_proj = Linear(hidden, inner + conv_dim + heads, bias=proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(conv_dim, 1, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(conv_dim)) if conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GroupedGatedRMSNorm(inner, inner // groups, eps)
        self.out_proj = Linear(inner, hidden, bias=proj_bias)
        self.act = ACTIVATIONS[act]

    def make_cache(self, capacity: int | None) -> StateCache:
        return StateCache(capacity)

    def kv_bytes_per_token(self, elem: int) -> int:
        return 0

    def state_bytes(self, elem: int) -> int:
        """One sequence: the conv window (model dtype) and the fp32 scan state."""
        conv_dim = self.inner + 2 * self.groups * self.d_state
        return conv_dim * (self.d_conv - 1) * elem + self.heads * self.head_dim * self.d_state * max(elem, 4)

    def forward(self, x: torch.Tensor, cache: StateCache | None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, H)
        if cache is not None:
            cache.check(T)
        GN = self.groups * self.d_state
        gate, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * GN, self.heads], dim=-1)
        xbc, conv = causal_conv(xbc.transpose(1, 2), self.conv_weight, self.conv_bias,
                                cache.conv if cache is not None else None)  # (B, C, T), (B, C, K-1)
        h, Bm, Cm = self.act(xbc).transpose(1, 2).split([self.inner, GN, GN], dim=-1)  # (B, T, I), (B, T, GN) x2
        f = wide(x.dtype)
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f)).clamp(*self.dt_limit)  # (B, T, heads)
        A = -torch.exp(self.A_log.to(f))  # (heads,)
        hf = h.to(f).view(B, T, self.heads, self.head_dim)  # (B, T, heads, p)
        Bm = Bm.to(f).view(B, T, self.groups, self.d_state)  # (B, T, G, N)
        Cm = Cm.to(f).view(B, T, self.groups, self.d_state)  # (B, T, G, N)
        S = cache.state if cache is not None and cache.state is not None else \
            x.new_zeros(B, self.heads, self.head_dim, self.d_state, dtype=f)  # (B, heads, p, N)
        if T == 1:
            y, S = ssd_step(hf[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], S)
            y = y[:, None]  # (B, 1, heads, p)
        else:
            y, S = ssd_chunked(hf, dt, A, Bm, Cm, S, self.chunk)  # (B, T, heads, p)
        if cache is not None:
            cache.update(conv, S, T)
        y = (y + hf * self.D.to(f)[:, None]).reshape(B, T, self.inner)  # (B, T, I)
        return self.out_proj(self.norm(y, gate).to(x.dtype))  # (B, T, H)
