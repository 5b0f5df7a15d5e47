"""Group-wise integer quantization of weight matrices, the dequantization reference, and
bit packing with no wasted bits.

A weight matrix W (N, K) is quantized along its input dimension K in groups of G
consecutive weights; each group has its own fp16 scale (and, asymmetric, an fp16 zero):

    symmetric   w = s * (q - (2^b - 1) / 2)      q in [0, 2^b - 1]
    asymmetric  w = s * q + z

The symmetric grid is centred on zero with half-integer levels (4-bit: +-0.5s ... +-7.5s),
so all 2^b levels are used and every weight in [-absmax, absmax] is within s/2 of a level
(an integer grid [-2^(b-1), 2^(b-1) - 1] wastes half a level and clamps one end).
Asymmetric grids follow the group's [min, max] and pay 16 more bits per group.

K is padded with zeros to a multiple of G (G a multiple of 64), so odd shapes cost a few
padding bytes; shapes whose K is a multiple of G pack exactly b bits per weight.

Packed layout, per row, in blocks of 64 consecutive weights (q[0..63] of the block):

    4-bit  32 bytes: two halves of 16 bytes; byte j of half h holds q[32h + j] in its low
           nibble and q[32h + 16 + j] in its high nibble.
    2-bit  16 bytes: byte j holds q[j], q[16 + j], q[32 + j], q[48 + j] at bits 0, 2, 4, 6.
    3-bit  24 bytes: sixteen 12-bit fields f[j] = q[j] | q[16 + j] << 3 | q[32 + j] << 6
           | q[48 + j] << 9, stored little-endian two per 3 bytes (f[2i] | f[2i+1] << 12
           in bytes 3i, 3i+1, 3i+2).
    8-bit  one byte per weight (packing only; int8 experts use kernels.Int8Matrix instead).

In every layout lane j of a block holds the codes 16t + j, so a SIMD kernel widens the
block into 16 int16 lanes once and gets each run of 16 consecutive weights with one
shift and one mask (see csrc/qmm.c).

Owns the codes and their layout; the matmuls on them are kernels.py's. The C build is
native.py's; `quantize_native` only calls its em_quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native

BLOCK = 64  # weights per packed block; group sizes are multiples of it
SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized: bits per weight, group size along K, zero points."""

    bits: int
    group: int
    asym: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits} (supported: {SUPPORTED_BITS})")
        if self.group <= 0 or self.group % BLOCK:
            raise ValueError(f"group size {self.group} must be a positive multiple of {BLOCK}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1  # largest q

    @property
    def offset(self) -> float:
        """Symmetric grid centre: w = s * (q - offset)."""
        return self.levels / 2

    def padded(self, k: int) -> int:
        """K rounded up to a whole number of groups."""
        return -(-k // self.group) * self.group

    def groups(self, k: int) -> int:
        return self.padded(k) // self.group

    def row_bytes(self, k: int) -> int:
        """Packed bytes per row of a (N, k) matrix."""
        return self.padded(k) * self.bits // 8


@dataclass
class Quantized:
    """A quantized (N, K) matrix: unpacked codes, scales, zeros (asymmetric only)."""

    q: torch.Tensor  # (N, Kp) uint8, values in [0, 2^b - 1]
    scale: torch.Tensor  # (N, Kp/G) fp16
    zero: torch.Tensor | None  # (N, Kp/G) fp16, or None when symmetric
    spec: QuantSpec
    k: int  # true K before padding


# Candidate range shrink factors tried per group when searching for the scale with the
# smallest squared error (clipping a few outliers buys resolution for the rest).
_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def quantize(
    w: torch.Tensor, spec: QuantSpec, search: bool = True, backend: str = "auto", rows_per_chunk: int = 1024
) -> Quantized:
    """Quantize w (N, K) group-wise.

    Without `search`, the grid spans the group's range exactly (symmetric: [-absmax,
    absmax]; asymmetric: [min, max]), so every weight is within s/2 of its level. With
    `search`, each group also tries narrower ranges (clipping outliers) plus one
    least-squares refit of scale and zero, and keeps whichever has the smallest squared
    error; the plain range is always a candidate, so search never does worse.

    backend "auto" runs the C implementation when it is built (same algorithm; sums in
    another order, so a near-tie between candidates may resolve differently), "torch" this
    file's reference.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if backend == "auto":
        res = quantize_native(w, spec, search)
        if res is not None:
            return Quantized(res[0], res[1], res[2], spec, k)
    elif backend != "torch":
        raise ValueError(f"unknown backend {backend!r}")
    kp, g = spec.padded(k), spec.group
    q = torch.empty(n, kp, dtype=torch.uint8)
    scale = torch.empty(n, kp // g, dtype=torch.float16)
    zero = torch.empty(n, kp // g, dtype=torch.float16) if spec.asym else None
    for r0 in range(0, n, rows_per_chunk):  # bound the fp32 working set
        r1 = min(n, r0 + rows_per_chunk)
        x = torch.zeros(r1 - r0, kp, dtype=torch.float32)
        x[:, :k] = w[r0:r1]
        x = x.view(r1 - r0, kp // g, g)  # (n, ng, G)
        qc, sc, zc = _quantize_groups(x, spec, search)
        q[r0:r1] = qc.reshape(r1 - r0, kp)
        scale[r0:r1] = sc
        if zero is not None:
            zero[r0:r1] = zc
    return Quantized(q, scale, zero, spec, k)


def quantize_native(w: torch.Tensor, spec: QuantSpec, search: bool):
    """The C version of `quantize` (same algorithm, ~50x faster), or None when the
    kernel is not built. Returns codes (N, Kp) uint8, scale and zero (N, Kp/G) fp16."""
    lib = native.get()
    if lib is None:
        return None
    w = w.detach().float().contiguous()
    n, k = w.shape
    kp, ng = spec.padded(k), spec.groups(k)
    q = torch.empty(n, kp, dtype=torch.uint8)
    scale = torch.empty(n, ng, dtype=torch.float16)
    zero = torch.empty(n, ng, dtype=torch.float16) if spec.asym else None
    rc = lib.em_quantize(
        w.data_ptr(), n, k, kp, spec.bits, spec.group, int(spec.asym), int(search),
        q.data_ptr(), scale.data_ptr(), zero.data_ptr() if zero is not None else None, torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_quantize failed with code {rc}")
    return q, scale, zero


def _quantize_groups(x: torch.Tensor, spec: QuantSpec, search: bool):
    """x (n, ng, G) fp32 -> codes (n, ng, G) uint8, scale (n, ng) fp16, zero (n, ng) fp16|None."""
    lv = spec.levels
    if spec.asym:
        lo, hi = x.amin(-1), x.amax(-1)  # (n, ng) x2
        mid = (lo + hi) / 2
    else:
        amax = x.abs().amax(-1)  # (n, ng)
    best = None
    for shrink in _SHRINK if search else (1.0,):
        if spec.asym:
            s = ((hi - lo) * shrink / lv).clamp_min(1e-12)  # (n, ng)
            z = mid - s * (lv / 2)  # lowest level, centred on the group's mid-range
            cand = _fit(x, s, z, spec)
        else:
            s = (amax * shrink / spec.offset).clamp_min(1e-12)
            cand = _fit(x, s, None, spec)
        best = cand if best is None else _better(best, cand)
    if search:
        best = _better(best, _refit(x, best[0], spec))
    q, s, z, _ = best
    return q, s, z


def _fit(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec):
    """Round scale/zero to fp16, then code x against the stored values."""
    s = s.to(torch.float16)
    s = torch.where(s == 0, torch.full_like(s, 6e-8), s)  # fp16 underflow: keep s > 0
    sf = s.float().unsqueeze(-1)  # (n, ng, 1)
    if z is None:
        q = torch.round(x / sf + spec.offset).clamp_(0, spec.levels)  # (n, ng, G)
        err = x - sf * (q - spec.offset)
    else:
        z = z.to(torch.float16)
        zf = z.float().unsqueeze(-1)
        q = torch.round((x - zf) / sf).clamp_(0, spec.levels)
        err = x - (sf * q + zf)
    return q.to(torch.uint8), s, z, err.square().sum(-1)  # codes, scale, zero, sse (n, ng)


def _better(a, b):
    """Per group, keep whichever candidate has the smaller squared error."""
    take = b[3] < a[3]  # (n, ng)
    q = torch.where(take.unsqueeze(-1), b[0], a[0])
    s = torch.where(take, b[1], a[1])
    z = None if a[2] is None else torch.where(take, b[2], a[2])
    return q, s, z, torch.where(take, b[3], a[3])


def _refit(x: torch.Tensor, q: torch.Tensor, spec: QuantSpec):
    """Least-squares scale (and zero) for fixed codes q, then re-code."""
    qf = q.float()
    if spec.asym:
        # Minimise sum (x - s q - z)^2 over s, z: a 2x2 linear regression per group.
        g = x.shape[-1]
        sq, sx = qf.sum(-1), x.sum(-1)
        sqq, sqx = (qf * qf).sum(-1), (qf * x).sum(-1)
        det = g * sqq - sq * sq
        ok = det > 0
        s = torch.where(ok, (g * sqx - sq * sx) / det.clamp_min(1e-12), torch.zeros_like(sx))
        z = torch.where(ok, (sx - s * sq) / g, sx / g)
        bad = s <= 0  # degenerate group (all codes equal): fall back to a tiny step
        s = torch.where(bad, torch.full_like(s, 1e-12), s)
        return _fit(x, s, z, spec)
    c = qf - spec.offset
    s = (c * x).sum(-1) / (c * c).sum(-1).clamp_min(1e-12)
    return _fit(x, s.clamp_min(1e-12), None, spec)


def dequantize(qz: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: codes back to weights (N, K), padding dropped."""
    spec = qz.spec
    n, kp = qz.q.shape
    g = spec.group
    qf = qz.q.view(n, kp // g, g).float()  # (N, ng, G)
    s = qz.scale.float().unsqueeze(-1)  # (N, ng, 1)
    if qz.zero is None:
        w = s * (qf - spec.offset)
    else:
        w = s * qf + qz.zero.float().unsqueeze(-1)
    return w.reshape(n, kp)[:, : qz.k].to(dtype)


# ----------------------------------------------------------------------------- packing


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q (N, Kp) uint8 -> packed (N, Kp * bits / 8) uint8 in the block layout above."""
    n, kp = q.shape
    if kp % BLOCK:
        raise ValueError(f"row length {kp} is not a multiple of {BLOCK}")
    nb = kp // BLOCK
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if bits == 4:
        b = q.view(n, nb, 2, 2, 16)  # (N, nb, half, nibble, j)
        return (b[:, :, :, 0] | (b[:, :, :, 1] << 4)).reshape(n, kp // 2)
    if bits == 2:
        return _pack2(q.view(n, nb, 4, 16)).reshape(n, kp // 4)  # (N, nb, t, j) -> (N, nb, 16)
    if bits == 3:
        c = q.view(n, nb, 4, 16).to(torch.int32)  # (N, nb, t, j)
        f = c[:, :, 0] | (c[:, :, 1] << 3) | (c[:, :, 2] << 6) | (c[:, :, 3] << 9)  # (N, nb, 16) 12-bit fields
        v = f[:, :, 0::2] | (f[:, :, 1::2] << 12)  # (N, nb, 8) 24-bit pairs
        b = torch.stack([v & 255, (v >> 8) & 255, v >> 16], dim=-1)  # (N, nb, 8, 3)
        return b.to(torch.uint8).reshape(n, kp * 3 // 8)
    raise ValueError(f"unsupported bit width {bits}")


def _pack2(t: torch.Tensor) -> torch.Tensor:
    """(..., 4, 16) two-bit codes -> (..., 16) bytes, code t at bits 2t."""
    return t[..., 0, :] | (t[..., 1, :] << 2) | (t[..., 2, :] << 4) | (t[..., 3, :] << 6)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (N, Kp * bits / 8) uint8 -> codes (N, Kp) uint8."""
    n, nbytes = packed.shape
    kp = nbytes * 8 // bits
    nb = kp // BLOCK
    p = packed.to(torch.uint8)
    if bits == 8:
        return p.clone()
    if bits == 4:
        b = p.reshape(n, nb, 2, 1, 16)
        return torch.cat([b & 15, b >> 4], dim=3).reshape(n, kp)
    if bits == 2:
        return _unpack2(p.reshape(n, nb, 16)).reshape(n, kp)
    if bits == 3:
        b = p.reshape(n, nb, 8, 3).to(torch.int32)
        v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (N, nb, 8)
        f = torch.stack([v & 0xFFF, v >> 12], dim=-1).reshape(n, nb, 16)  # (N, nb, j)
        return torch.stack([(f >> (3 * t)) & 7 for t in range(4)], dim=2).to(torch.uint8).reshape(n, kp)
    raise ValueError(f"unsupported bit width {bits}")


def _unpack2(b: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 4, 16) two-bit codes."""
    return torch.stack([(b >> (2 * t)) & 3 for t in range(4)], dim=-2)
