"""Recurrent token mixers for the hybrid MoE families and the per-layer state they keep.

A hybrid model interleaves attention layers with layers whose memory of the past is a
fixed-size state instead of a KV cache: Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE), gated
short convolutions (LFM2-MoE) and Mamba selective scans (mamba.py: Jamba, Granite 4.0-H).
A mixer sits in a decoder layer's `attn` slot and follows the attention contract
(`make_cache(capacity)`, `kv_bytes_per_token(elem)`, `forward(x, cache)`); it also says
how many bytes its state takes per sequence (`state_bytes(elem)`), whatever the context.

A state cache cannot be trimmed back to an earlier position: the state after n tokens
is not recoverable from the state after n + m. `StateCache.can_trim` is False; trimming
everything (back to an empty sequence) works, trimming part of it raises StateTrimError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import Linear
from ..errors import ContextLengthError
from ..experts import ACTIVATIONS


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrences run in: fp32, or the model's own if wider (float64 checks)."""
    return torch.promote_types(dtype, torch.float32)


class StateTrimError(RuntimeError):
    """A recurrent state was asked to forget some but not all of its positions."""


class StateCache:
    """The state of one recurrent layer for a batch of sequences.

    `conv` holds the last K-1 inputs of the layer's causal convolution (B, C, K-1) in the
    model dtype; `state` its recurrence state (fp32, see `wide`; shape per mixer). Both
    are replaced by every forward. `offset` counts the positions seen, as KVCache's does,
    and `capacity` (the context size; None: unbounded) is enforced the same way."""

    can_trim = False  # see the module docstring: prefix reuse must recompute instead

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.offset = 0
        self.conv: torch.Tensor | None = None
        self.state: torch.Tensor | None = None

    def check(self, T: int) -> None:
        """Raise ContextLengthError if T more positions do not fit; call before any update."""
        end = self.offset + T
        if self.capacity is not None and end > self.capacity:
            raise ContextLengthError(
                f"the context is full: {end} tokens do not fit the context size of {self.capacity} "
                "(--ctx-size / ctx_size)")

    def update(self, conv: torch.Tensor | None, state: torch.Tensor | None, T: int) -> None:
        self.conv, self.state = conv, state
        self.offset += T

    def trim(self, n: int) -> None:
        """Forget the last n positions: only all of them (n >= offset) or none (n <= 0)."""
        if n <= 0:
            return
        if n < self.offset:
            raise StateTrimError(
                f"a recurrent layer's state cannot be trimmed from {self.offset} to {self.offset - n} positions; "
                "recompute the prompt from the start instead (StateCache.can_trim is False)")
        self.offset, self.conv, self.state = 0, None, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of x (B, C, T) with weight (C, 1, K), continuing from
    `prev` (B, C, K-1), the inputs before x (None: zeros). Returns the output (B, C, T)
    and the last K-1 inputs, the next call's `prev`."""
    B, C, T = x.shape
    K = weight.shape[-1]
    if prev is None:
        prev = x.new_zeros(B, C, K - 1)
    full = torch.cat([prev.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    y = F.conv1d(full, weight, bias, groups=C)  # (B, C, T)
    return y, full[:, :, full.shape[-1] - (K - 1):]  # (B, C, K-1)


class GatedRMSNorm(nn.Module):
    """RMSNorm of x (fp32, weight applied in x's dtype) times silu(gate), as the Gated
    DeltaNet output norm computes it (norm before gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.to(wide(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(x.dtype) * F.silu(gate.to(xf.dtype))).to(x.dtype)


# ----------------------------------------------------------------------------- gated delta rule


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule, all fp32: q, k (B, h, dk), v (B, h, dv), log
    decay g and write strength beta (B, h), state S (B, h, dk, dv). The state decays by
    exp(g), then stores beta * (v - what it already predicts for k) under k; the output
    reads the new state with q. Returns (output (B, h, dv), new state)."""
    S = S * g.exp()[..., None, None]  # (B, h, dk, dv)
    predicted = (k.unsqueeze(-2) @ S).squeeze(-2)  # (B, h, dv)
    delta = (v - predicted) * beta[..., None]  # (B, h, dv)
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)  # (B, h, dk, dv)
    return (q.unsqueeze(-2) @ S).squeeze(-2), S  # (B, h, dv)


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       S: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a sequence, a chunk of positions at a time: q, k
    (B, h, T, dk), v (B, h, T, dv), g, beta (B, h, T), S (B, h, dk, dv), all fp32.
    Returns (outputs (B, h, T, dv), final state); equal to T `delta_rule_step`s up to
    rounding.

    In a chunk, with G_t = exp(g_1 + ... + g_t) and S0 the state before it, the state is
    S_t = G_t S0 + sum_{s<=t} (G_t/G_s) k_s w_s^T, where w_s = beta_s (v_s - (decayed state
    before s)^T k_s) is what position s writes. Substituting S_{s-1} into w_s gives a unit
    lower-triangular system (I + A) W = beta V - (beta G K) S0 with
    A[s, r] = beta_s (G_s/G_r) k_s.k_r for r < s, solved once per chunk."""
    B, h, T, dk = k.shape
    outs = []
    for start in range(0, T, chunk):
        qc, kc, vc = (t[:, :, start:start + chunk] for t in (q, k, v))  # (B, h, L, d)
        gc, bc = g[:, :, start:start + chunk], beta[:, :, start:start + chunk]  # (B, h, L)
        L = kc.shape[2]
        cum = gc.cumsum(-1)  # (B, h, L) log G_t
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # (L, L) s <= t
        # G_t / G_s for s <= t, 0 above; differences taken in log space (G_t alone underflows).
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, h, L, L)
        kb = kc * bc[..., None]  # (B, h, L, dk)
        A = ((kb @ kc.transpose(-1, -2)) * decay).tril(-1)  # (B, h, L, L)
        system = A + torch.eye(L, dtype=A.dtype, device=A.device)
        rhs = vc * bc[..., None] - (kb * cum.exp()[..., None]) @ S  # (B, h, L, dv)
        W = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # (B, h, L, dv)
        outs.append((qc * cum.exp()[..., None]) @ S + ((qc @ kc.transpose(-1, -2)) * decay) @ W)  # (B, h, L, dv)
        last = cum[..., -1:]  # (B, h, 1)
        S = S * last.exp()[..., None] + (kc * (last - cum).exp()[..., None]).transpose(-1, -2) @ W  # (B, h, dk, dv)
    return torch.cat(outs, dim=2), S


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (Qwen3-Next / Qwen3.5 linear-attention layers).

    x -> qkv -> causal conv (kernel K) + activation -> q, k (nk heads of dk), v (nv heads
    of dv; each q/k head serves nv/nk value heads); q and k are L2-normalised and q scaled
    by dk^-0.5; beta = sigmoid(b), decay g = -exp(A_log) softplus(a + dt_bias) per value
    head; the gated delta rule mixes them; the output is RMS-normed, gated by silu(z) and
    projected back by `out`.

    With `grouped` (Qwen3-Next's layout) the input projections come as two: `in_qkvz`,
    whose rows are, per q/k head, that head's q, k and the v then z of its value heads,
    and `in_ba`, per q/k head the b then the a of its value heads. Otherwise (Qwen3.5)
    they are four: `in_qkv` (all q, all k, all v), `in_z`, `in_b` and `in_a`."""

    CHUNK = 64

    def __init__(self, hidden: int, nk: int, nv: int, dk: int, dv: int, kernel: int, act: str, eps: float,
                 grouped: bool = False):
        super().__init__()
        self.nk, self.nv, self.dk, self.dv, self.kernel, self.grouped = nk, nv, dk, dv, kernel, grouped
        conv_dim = 2 * nk * dk + nv * dv
        if grouped:
            self.in_qkvz = Linear(hidden, conv_dim + nv * dv, bias=False)
            self.in_ba = Linear(hidden, 2 * nv, bias=False)
        else:
            self.in_qkv = Linear(hidden, conv_dim, bias=False)
            self.in_z = Linear(hidden, nv * dv, bias=False)
            self.in_b = Linear(hidden, nv, bias=False)
            self.in_a = Linear(hidden, nv, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(conv_dim, 1, kernel))
        self.A_log = nn.Parameter(torch.empty(nv))
        self.dt_bias = nn.Parameter(torch.empty(nv))
        self.norm = GatedRMSNorm(dv, eps)
        self.out = Linear(nv * dv, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def make_cache(self, capacity: int | None) -> StateCache:
        return StateCache(capacity)

    def kv_bytes_per_token(self, elem: int) -> int:
        return 0  # nothing grows with the context

    def state_bytes(self, elem: int) -> int:
        """Bytes of one sequence's state: the conv window (model dtype) and the fp32 delta state."""
        conv = (2 * self.nk * self.dk + self.nv * self.dv) * (self.kernel - 1) * elem
        return conv + self.nv * self.dk * self.dv * max(elem, 4)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> qkv (B, T, C) laid out [all q | all k | all v], z (B, T, nv, dv),
        b and a (B, T, nv), from either projection layout."""
        B, T, _ = x.shape
        if not self.grouped:
            return self.in_qkv(x), self.in_z(x).view(B, T, self.nv, self.dv), self.in_b(x), self.in_a(x)
        r = self.nv // self.nk
        per_head = self.in_qkvz(x).view(B, T, self.nk, 2 * self.dk + 2 * r * self.dv)  # (B, T, nk, .)
        q, k, v, z = per_head.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = self.in_ba(x).view(B, T, self.nk, 2 * r).split([r, r], dim=-1)  # (B, T, nk, r) x2
        qkv = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)  # (B, T, C)
        return qkv, z.reshape(B, T, self.nv, self.dv), b.reshape(B, T, self.nv), a.reshape(B, T, self.nv)

    def forward(self, x: torch.Tensor, cache: StateCache | None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, H)
        if cache is not None:
            cache.check(T)
        qkv, z, b, a = self.project(x)
        qkv, conv = causal_conv(qkv.transpose(1, 2), self.conv_weight, None,
                                cache.conv if cache is not None else None)  # (B, C, T), (B, C, K-1)
        qkv = self.act(qkv).transpose(1, 2)  # (B, T, C)
        kd = self.nk * self.dk
        q, k, v = qkv.split([kd, kd, self.nv * self.dv], dim=-1)
        r = self.nv // self.nk
        # fp32, heads first; each q/k head repeated for the r value heads it serves.
        f = wide(x.dtype)
        q = l2norm(q.reshape(B, T, self.nk, self.dk).to(f)) * self.dk**-0.5  # (B, T, nk, dk)
        k = l2norm(k.reshape(B, T, self.nk, self.dk).to(f))  # (B, T, nk, dk)
        q = q.repeat_interleave(r, dim=2).transpose(1, 2)  # (B, nv, T, dk)
        k = k.repeat_interleave(r, dim=2).transpose(1, 2)  # (B, nv, T, dk)
        v = v.reshape(B, T, self.nv, self.dv).to(f).transpose(1, 2)  # (B, nv, T, dv)
        beta = torch.sigmoid(b).to(f).transpose(1, 2)  # (B, nv, T)
        g = (-self.A_log.to(f).exp() * F.softplus(a.to(f) + self.dt_bias.to(f))).transpose(1, 2)  # (B, nv, T)
        S = cache.state if cache is not None and cache.state is not None else \
            x.new_zeros(B, self.nv, self.dk, self.dv, dtype=f)  # (B, nv, dk, dv)
        if T == 1:
            o, S = delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], S)
            o = o.unsqueeze(2)  # (B, nv, 1, dv)
        else:
            o, S = delta_rule_chunked(q, k, v, g, beta, S, self.CHUNK)  # (B, nv, T, dv)
        if cache is not None:
            cache.update(conv, S, T)
        o = o.transpose(1, 2).to(x.dtype)  # (B, T, nv, dv)
        return self.out(self.norm(o, z).reshape(B, T, self.nv * self.dv))  # (B, T, H)


class ShortConv(nn.Module):
    """LFM2's gated short convolution: in_proj splits into b, c, x (each hidden wide);
    y = c * conv(b * x) with a depthwise causal kernel of `kernel` taps, then out_proj."""

    def __init__(self, hidden: int, kernel: int, bias: bool):
        super().__init__()
        self.hidden, self.kernel = hidden, kernel
        self.in_proj = Linear(hidden, 3 * hidden, bias=bias)
        self.conv_weight = nn.Parameter(torch.empty(hidden, 1, kernel))
        self.conv_bias = nn.Parameter(torch.empty(hidden)) if bias else None
        self.out_proj = Linear(hidden, hidden, bias=bias)

    def make_cache(self, capacity: int | None) -> StateCache:
        return StateCache(capacity)

    def kv_bytes_per_token(self, elem: int) -> int:
        return 0

    def state_bytes(self, elem: int) -> int:
        return self.hidden * (self.kernel - 1) * elem

    def forward(self, x: torch.Tensor, cache: StateCache | None) -> torch.Tensor:
        T = x.shape[1]  # x (B, T, H)
        if cache is not None:
            cache.check(T)
        b, c, h = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)  # (B, H, T) x3
        y, conv = causal_conv(b * h, self.conv_weight, self.conv_bias,
                              cache.conv if cache is not None else None)  # (B, H, T), (B, H, K-1)
        if cache is not None:
            cache.update(conv, None, T)
        return self.out_proj((c * y).transpose(1, 2))  # (B, T, H)
