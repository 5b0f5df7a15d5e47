"""The large-batch (prefill) path of the quantized matmul: dequantization to bf16 by table
lookup in every x86 instruction-set variant, the power-of-two row blocks oneDNN gets, and
products stored straight in the caller's dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgemoe.cpu import bucket_rows
from edgemoe.quant import kernels as K
from edgemoe.quant import native as N
from edgemoe.quant.quantize import QuantSpec, pack, quantize

X86_VARIANTS = ["generic", "avx2", "avxvnni", "avx512vnni"]


@pytest.fixture(autouse=True)
def restore():
    K.use_native(True)
    yield
    K.use_native(True)
    if N.get() is not None:
        N.set_isa(None)


def need_native():
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")


def make(n: int, k: int, spec: QuantSpec, seed: int = 0) -> K.QMatrix:
    g = torch.Generator().manual_seed(seed)
    qz = quantize(torch.randn(n, k, generator=g) * 0.05, spec, search=False)
    return K.QMatrix(pack(qz.q, spec.bits), qz.scale, qz.zero, spec, k)


def with_tie_scales(w: K.QMatrix) -> K.QMatrix:
    """Scales whose products with small codes land exactly halfway between two bf16
    values (1 + 2^-8 times an odd code), huge, tiny (fp16 subnormal) and negative ones:
    the cases where a wrong rounding shows."""
    special = torch.tensor([1 + 2**-8, 3 * (1 + 2**-8), -(1 + 2**-8), 6e-8, -6e-8, 60000.0, -3.5, 0.0],
                           dtype=torch.float16)
    scale = w.scale.clone()
    flat = scale.view(-1)
    flat[: flat.numel() // 2] = special.repeat(flat.numel() // 16 + 1)[: flat.numel() // 2]
    return K.QMatrix(w.packed, scale, w.zero, w.spec, w.k)


@pytest.mark.parametrize("isa", X86_VARIANTS if N.arch() == "x86_64" else ["native"])
def test_bf16_dequant_is_the_fp32_one_rounded(isa):
    """em_dequant to bf16 (a table of a block's values, looked up per code, on AVX2 and
    AVX-512) gives bit for bit the fp32 dequantization rounded to nearest even, for every
    bit width, symmetric and asymmetric, whole and partial blocks, groups of 64 and 128."""
    need_native()
    if isa != "native":
        if not N.isa_supported(isa):
            pytest.skip(f"this CPU does not run the {isa} variant (it runs: {', '.join(N.supported_isas())})")
        N.set_isa(isa)
    for bits in (2, 3, 4):
        for asym in (False, True):
            for n, k, group in ((70, 256, 64), (33, 200, 64), (40, 384, 128)):
                w = with_tie_scales(make(n, k, QuantSpec(bits, group, asym), seed=bits))
                f32 = K.dequant_rows(w, 0, n, torch.float32)
                got = K.dequant_rows(w, 0, n, torch.bfloat16)
                assert torch.equal(got.view(torch.int16), f32.to(torch.bfloat16).view(torch.int16)), (bits, asym, k)
                part = K.dequant_rows(w, 5, 29, torch.bfloat16)
                assert torch.equal(part.view(torch.int16), got[5:29].view(torch.int16))


def test_row_blocks_cover_the_rows_in_power_of_two_blocks(monkeypatch):
    monkeypatch.setattr(K, "onednn_used", lambda dtype: True)
    for m in range(1, 700):
        blocks = K.row_blocks(m, torch.bfloat16)
        if m <= K.ROW_BLOCK_MIN or bucket_rows(m) == m:
            assert blocks == [(0, m)]
            continue
        rows = [r for a, b in blocks for r in range(a, b)]
        assert set(rows) == set(range(m)) and len(rows) <= m + 1, (m, blocks)  # at most one row twice
        assert all(b - a >= 2 for a, b in blocks), (m, blocks)  # no lone row: torch computes it another way
        for a, b in blocks[:-1]:
            assert b - a == bucket_rows(b - a) >= K.ROW_BLOCK_MIN, (m, blocks)
        padded = sum(bucket_rows(b - a) for a, b in blocks)  # what oneDNN computes
        assert padded < m + K.ROW_BLOCK_MIN + 2, (m, blocks)  # was bucket_rows(m): up to 2x
    assert K.row_blocks(130, torch.bfloat16) == [(0, 128), (128, 130)]  # 130 rows, not 256
    monkeypatch.setattr(K, "onednn_used", lambda dtype: False)
    assert K.row_blocks(130, torch.float32) == [(0, 130)]  # no padding to avoid: one call


@pytest.mark.parametrize("m", [33, 79, 130, 150])
def test_blocked_matmul_matches_one_call(m, monkeypatch):
    """The dequantize + matmul path in row blocks gives what one matmul of all rows gives
    (bit for bit wherever measured; here within bf16 rounding), and fp32 outputs are the
    bf16 products converted exactly."""
    need_native()
    monkeypatch.setattr(K, "MATMUL_DTYPE", torch.bfloat16)
    monkeypatch.setattr(K, "PACKED_MAX_BATCH", 8)
    monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU", 8)
    monkeypatch.setattr(K, "DEQUANT_ROWS", 96)  # several weight chunks, the last one short
    monkeypatch.setattr(K, "onednn_used", lambda dtype: True)  # blocks even where oneDNN is not used
    w = make(250, 192, QuantSpec(4, 64))
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    ref = F.linear(x, K.dequant_rows(w, 0, w.n, torch.bfloat16))  # (M, N), one call
    y = K.qmm(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (m, 250)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=1e-3)
    assert torch.equal(K.qmm(x, w, torch.float32), y.float())
