"""Group-wise quantization error bounds and bit packing."""

from __future__ import annotations

import pytest
import torch

from edgemoe.quant import kernels as K
from edgemoe.quant.kernels import quantize_int8
from edgemoe.quant.quantize import QuantSpec, dequantize, pack, quantize, unpack

SPECS = [QuantSpec(b, g, a) for b in (2, 3, 4) for g in (64, 128) for a in (False, True)]
# "auto" is the C implementation when it builds; "torch" the reference it mirrors.
BACKENDS = ["torch", "auto"]


def _levels_and_step(qz):
    """Per element: its step s (N, Kp) and whether its code is at either end of the grid."""
    g = qz.spec.group
    s = qz.scale.float().repeat_interleave(g, dim=1)[:, : qz.k]
    q = qz.q[:, : qz.k]
    return s, (q == 0) | (q == qz.spec.levels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_plain_rounding_is_within_half_a_step(spec, backend):
    torch.manual_seed(0)
    w = torch.randn(37, 200) * torch.rand(37, 1) * 0.1  # odd shape: K padded to whole groups
    qz = quantize(w, spec, search=False, backend=backend)
    assert qz.q.shape == (37, spec.padded(200)) and int(qz.q.max()) <= spec.levels
    s, _ = _levels_and_step(qz)
    err = (dequantize(qz) - w).abs()
    # s/2 plus the fp16 rounding of scale and zero (a few ulps of the group's range)
    assert bool((err <= s * 0.5 * 1.01 + 1e-6).all()), float((err / s).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_search_never_worse_and_only_clips_at_the_ends(spec, backend):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(4.0).sample((64, 256))  # heavy tails: clipping pays
    plain = quantize(w, spec, search=False, backend=backend)
    best = quantize(w, spec, search=True, backend=backend)
    g = spec.group
    sse_plain = (dequantize(plain) - w).square().view(64, -1, g).sum(-1)
    sse_best = (dequantize(best) - w).square().view(64, -1, g).sum(-1)
    assert bool((sse_best <= sse_plain * (1 + 1e-3) + 1e-9).all())  # per group
    assert float(sse_best.sum()) < 0.97 * float(sse_plain.sum())
    # Inside the grid every weight is within half a step; beyond it only clipped codes.
    s, at_end = _levels_and_step(best)
    err = (dequantize(best) - w).abs()
    assert bool(((err <= s * 0.5 * 1.01 + 1e-6) | at_end).all())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_native_matches_torch_reference(spec):
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    torch.manual_seed(5)
    w = torch.distributions.StudentT(4.0).sample((48, 320))
    for search in (False, True):
        ref = quantize(w, spec, search=search, backend="torch")
        nat = quantize(w, spec, search=search, backend="auto")
        # Same algorithm; only sums run in another order, so near-ties may differ.
        assert float((ref.q == nat.q).float().mean()) > 0.995
        sse_ref = float((dequantize(ref) - w).square().sum())
        sse_nat = float((dequantize(nat) - w).square().sum())
        assert sse_nat == pytest.approx(sse_ref, rel=1e-3)
        if not search:
            assert torch.equal(ref.q, nat.q) and torch.equal(ref.scale, nat.scale)


def test_error_shrinks_with_bits():
    torch.manual_seed(2)
    w = torch.randn(128, 512)
    rel = {}
    for b in (2, 3, 4):
        qz = quantize(w, QuantSpec(b, 64), search=True)
        rel[b] = float((dequantize(qz) - w).norm() / w.norm())
    q8 = quantize_int8(w)
    rel[8] = float((q8.q.float() * q8.scale.float()[:, None] - w).norm() / w.norm())
    # Gaussian weights, 64 per group: measured 0.34, 0.18, 0.093, 0.0074 (int8: one scale per row)
    assert rel[2] < 0.36 and rel[3] < 0.2 and rel[4] < 0.1 and rel[8] < 0.009
    assert rel[2] > rel[3] > rel[4] > rel[8]


def test_int8_within_half_a_step():
    torch.manual_seed(3)
    w = torch.randn(50, 70) * 3
    for dt in (torch.bfloat16, torch.float16):
        m = quantize_int8(w, dt)
        assert m.q.dtype == torch.int8 and m.scale.dtype == dt and int(m.q.abs().max()) <= 127
        err = (m.q.float() * m.scale.float()[:, None] - w).abs()
        assert bool((err <= m.scale.float()[:, None] / 2 * 1.001).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_groups(backend):
    w = torch.zeros(4, 128)
    w[1] = 0.25  # constant group
    w[2, :64] = -3.0
    for spec in (QuantSpec(2, 64), QuantSpec(3, 64, asym=True), QuantSpec(4, 64)):
        qz = quantize(w, spec, backend=backend)
        err = (dequantize(qz) - w).abs().max()
        assert torch.isfinite(qz.scale.float()).all()
        assert float(err) <= 3.0 / spec.levels, spec  # never worse than half the range


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_exact_size(bits):
    torch.manual_seed(4)
    q = torch.randint(0, 1 << bits, (9, 320), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (9, 320 * bits // 8)
    assert p.numel() * 8 == bits * q.numel()  # no wasted bits: 3-bit is 3 bits per weight
    assert torch.equal(unpack(p, bits), q)


def test_packed_byte_layout():
    """The block layout the C kernel relies on (documented in quantize.py)."""
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 16], q[0, 33] = 5, 9
    p4 = pack(q, 4)[0]
    assert p4[0] == 5 << 4 and p4[17] == 9 and int(p4.sum()) == (5 << 4) + 9
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 0], q[0, 21], q[0, 63] = 3, 2, 1  # 2-bit: byte j holds 16t + j at bits 2t
    p2 = pack(q, 2)[0]
    assert p2[0] == 3 and p2[5] == 2 << 2 and p2[15] == 1 << 6
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 0], q[0, 16], q[0, 25], q[0, 49] = 7, 5, 4, 6  # 3-bit: 12-bit field j = codes 16t + j at 3t
    p3 = pack(q, 3)[0].tolist()
    f0, f9, f1 = 7 | 5 << 3, 4 << 3, 6 << 9  # fields 0, 9 (q[25] = 16*1 + 9), 1 (q[49] = 16*3 + 1)
    assert p3[0:3] == [(f0 | f1 << 12) & 255, ((f0 | f1 << 12) >> 8) & 255, (f0 | f1 << 12) >> 16]
    assert p3[12:15] == [0, (f9 << 4) & 255, f9 >> 4]  # fields 8 and 9 share bytes 12-14
    assert pack(q, 3).numel() == 24


def test_quantspec_validation():
    with pytest.raises(ValueError):
        QuantSpec(5, 64)
    with pytest.raises(ValueError):
        QuantSpec(4, 32)
    sp = QuantSpec(3, 128)
    assert sp.padded(96) == 128 and sp.padded(256) == 256 and sp.row_bytes(256) == 96
