"""Small decode-step ops as one C call each (quant/csrc/decode.c), with torch fallbacks.

At one token per step an RMSNorm over 2048 values or one position's attention costs a
decode step far more in torch's per-op overhead (5-15 us an op, 6-10 ops each) than in
arithmetic (edgemoe_lab/results/decode_profile.md). The C versions round where the torch
ops round, so they agree with them up to the order of fp32 sums; every caller takes the
same path for the same shapes, so offloaded, cached and batched runs compute what the
in-RAM run does. Without the kernel library (no C compiler) the torch versions run.

Model code imports these (models/ may not import edgemoe.quant); the library comes from
quant/native.py, loaded on first use.
"""

from __future__ import annotations

import torch

_DT = {torch.float32: 0, torch.bfloat16: 1}
_C_ROWS = 64  # rms_norm: up to this many rows in C (decode steps, batched ones too); prefill in torch


_native = None  # edgemoe.quant.native, imported on first use


def _lib():
    global _native
    if _native is None:
        from .quant import native

        _native = native
    return _native.library.get()  # None when switched off or not built


def _grad(*ts) -> bool:
    """Whether autograd would record an op on these tensors (the C calls keep no graph:
    with gradients wanted, e.g. the profiler's Taylor estimate, the torch ops run)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension: normalised in fp32,
    rounded to x's dtype, then scaled (as the reference models do)."""
    if (x.dtype in _DT and weight.dtype == x.dtype and x.is_contiguous() and x.numel() <= _C_ROWS * x.shape[-1]
            and not _grad(x, weight)):
        lib = _lib()
        if lib is not None:
            out = torch.empty_like(x)
            H = x.shape[-1]
            if lib.em_rmsnorm(x.data_ptr(), _DT[x.dtype], x.numel() // H, H, weight.contiguous().data_ptr(),
                              float(eps), out.data_ptr()) == 0:
                return out
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor,
               pos: int, scale: float | None) -> torch.Tensor | None:
    """Write one position's k (1, kv, 1, D) and v (1, kv, 1, Dv) into the cache buffers
    kbuf (1, kv, cap, D) / vbuf at `pos`, then attend with q (1, heads, 1, D) over positions
    0..pos as `models.attention.decode_attention` does: (1, heads, 1, Dv). None when the C
    kernel cannot take it (the caller then runs the torch ops)."""
    dt = _DT.get(q.dtype)
    if (dt is None or not (k.dtype == v.dtype == kbuf.dtype == vbuf.dtype == q.dtype) or q.shape[0] != 1
            or kbuf.shape[0] != 1 or not (kbuf.is_contiguous() and vbuf.is_contiguous())):
        return None
    lib = _lib()
    if lib is None:
        return None
    heads, D = q.shape[1], q.shape[-1]
    kvh, cap, Dv = kbuf.shape[1], kbuf.shape[2], vbuf.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(1, heads, 1, Dv, dtype=q.dtype)
    rc = lib.em_attend1(q.data_ptr(), k.data_ptr(), v.data_ptr(), dt, kbuf.data_ptr(), vbuf.data_ptr(), cap, pos,
                        heads, kvh, D, Dv, float(scale if scale is not None else D**-0.5), out.data_ptr(),
                        torch.get_num_threads())
    return out if rc == 0 else None


def kernel_key() -> tuple:
    """The kernel settings a fused call's matrix descriptions depend on (quant/kernels.py's
    activation paths, the library switched on or off): descriptions made under another key
    are made again."""
    global _kernels
    if _kernels is None:
        from .quant import kernels

        _kernels = kernels
    k = _kernels
    return (id(_lib()), k.ACTIVATIONS, k.RESIDENT_ACTIVATIONS, k.INT8PACK_PREFERRED)


_kernels = None  # edgemoe.quant.kernels, imported on first use


class AttnHalfArgs:
    """The matrix descriptions of one attention module for `attn_half`, as a ctypes array
    kept between calls (rebuilt only when a description changes: another kernel setting)."""

    def __init__(self):
        self.key: tuple | None = None
        self.array = None

    def get(self, descs: tuple):
        if descs != self.key:
            import ctypes

            flat = [v for d in descs for v in d]
            self.key, self.array = descs, (ctypes.c_int64 * len(flat))(*flat)
        return self.array


def attn_half(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, mats, heads: int, kv_heads: int,
              head_dim: int, cos: torch.Tensor, sin: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, pos: int,
              scale: float | None) -> torch.Tensor | None:
    """x + o(attention(rope(q(n)), rope(k(n)), v(n))), n = rms_norm(x), for one position
    of one sequence (x (1, 1, H)) in one C call (csrc/decode.c em_attn_half1), appending k
    and v to kbuf / vbuf (1, kv, cap, D) at `pos`: the same kernels, in the same order and
    rounding, as the module-by-module path. `mats`: the ctypes array of the q, k, v and o
    descriptions (AttnHalfArgs). None when the C library is not there."""
    lib = _lib()
    dt = _DT.get(x.dtype)
    if lib is None or dt is None:
        return None
    out = torch.empty_like(x)  # (1, 1, H)
    rc = lib.em_attn_half1(x.data_ptr(), dt, x.shape[-1], norm_weight.data_ptr(), float(eps), mats, heads,
                           kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(),
                           kbuf.shape[2], pos, float(scale if scale is not None else head_dim**-0.5), out.data_ptr(),
                           torch.get_num_threads())
    return out if rc == 0 else None


def route_softmax(x: torch.Tensor, weight: torch.Tensor, top_k: int,
                  norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Softmax top-k routing of x (N, H) with gate `weight` (E, H) in one C call
    (csrc/decode.c em_route_softmax): (weights (N, k) in x's dtype, ids (N, k), logits (N, E)),
    as models.routers.Router computes them (logits rounded to x's dtype, softmax in fp32, the
    top k descending, renormalised with `norm_topk`), the gate's products summed in the C
    code's own fixed order. None when it cannot take the call: more than _C_ROWS rows (the
    caller's torch ops run; prefill), another dtype, or no kernel library."""
    dt = _DT.get(x.dtype)
    if (dt is None or weight.dtype != x.dtype or x.numel() > _C_ROWS * x.shape[-1] or not x.is_contiguous()
            or _grad(x, weight)):
        return None
    lib = _lib()
    if lib is None:
        return None
    N, (E, H) = x.numel() // x.shape[-1], weight.shape
    logits = torch.empty(N, E, dtype=x.dtype)
    weights = torch.empty(N, top_k, dtype=x.dtype)
    ids = torch.empty(N, top_k, dtype=torch.int64)
    if lib.em_route_softmax(x.data_ptr(), dt, N, H, weight.contiguous().data_ptr(), E, top_k, int(norm_topk),
                            logits.data_ptr(), weights.data_ptr(), ids.data_ptr()) != 0:
        return None
    return weights, ids, logits


def combine(slots: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """One token's k expert outputs slots (k, H) weighted by weights (1, k) and summed,
    (1, H), plus `residual` (any shape of H values) when given, in that shape: what
    `(slots.view(1, k, H) * weights.unsqueeze(-1)).sum(dim=1)` (+ residual) computes in torch,
    rounded where it rounds, in one C call. None when the C library cannot take it, and for
    more than four fp32 slots: torch then sums some columns in another order (bf16 sums,
    of any length, and fp32 ones of up to four rows run in slot order, which the C code
    follows; tests/test_fastops.py checks it)."""
    dt = _DT.get(slots.dtype)
    if (dt is None or weights.dtype != slots.dtype or not slots.is_contiguous() or (dt == 0 and slots.shape[0] > 4)
            or (residual is not None and (residual.dtype != slots.dtype or not residual.is_contiguous()))
            or _grad(slots, weights, residual)):
        return None
    lib = _lib()
    if lib is None:
        return None
    k, H = slots.shape
    out = torch.empty(1, H, dtype=slots.dtype) if residual is None else torch.empty_like(residual)
    w = weights.contiguous()
    rc = lib.em_combine1(slots.data_ptr(), w.data_ptr(), dt, k, H,
                         None if residual is None else residual.data_ptr(), out.data_ptr())
    return out if rc == 0 else None
