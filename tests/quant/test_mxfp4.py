"""MXFP4 (OCP MX): dequantization against transformers' own, quantization by hand per the
spec, the kernel against a float matmul, and the expert format."""

from __future__ import annotations

import pytest
import torch

from edgemoe.errors import StoreError
from edgemoe.experts import DenseExpert
from edgemoe.quant import kernels, mxfp4
from edgemoe.quant.formats import get_format


def random_codes(n: int, g: int, seed: int = 0, lo: int = 100, hi: int = 140):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, g, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(lo, hi, (n, g), generator=gen, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers(dtype):
    """The same values as transformers.integrations.mxfp4.convert_moe_packed_tensors
    (which returns the fused (E, K, N) layout) over the whole E8M0 range."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    E, N, G = 3, 10, 4
    blocks, scales = random_codes(E * N, G, lo=0, hi=254)
    blocks, scales = blocks.view(E, N, G, 16), scales.view(E, N, G)
    scales[0, 0, :] = torch.tensor([0, 1, 253, 127], dtype=torch.uint8)  # extremes of the exponent range
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, G*32, N)
    for e in range(E):
        got = mxfp4.dequantize(blocks[e], scales[e], dtype=dtype)  # (N, G*32)
        assert got.dtype == dtype
        assert torch.equal(got.T, want[e])


def test_quantize_by_hand():
    """One block with max |w| = 7: shared exponent floor(log2 7) - 2 = 0 (E8M0 code 127);
    elements round to the nearest FP4 value, ties to the even code, 7 saturates to 6,
    a small negative becomes +0. The same block times 2^-10 only changes the exponent."""
    row = [6, 3, -1.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -0.1, 0.5, -6, 4, 1] + [0.0] * 16
    # FP4 codes: 6->7, 3->5, -1.5->8+3, 0.25->0 (tie: 0 even), 0.75->2 (tie: 1.0 even),
    # 1.25->2 (tie: 1.0), 1.75->4 (tie: 2.0), 2.5->4 (tie: 2.0), 3.5->6 (tie: 4.0),
    # 5->6 (tie: 4.0), 7->7 (saturate), -0.1->0, 0.5->1, -6->15, 4->6, 1->2.
    codes = [7, 5, 11, 0, 2, 2, 4, 4, 6, 6, 7, 0, 1, 15, 6, 2] + [0] * 16
    w = torch.tensor([row, [v * 2**-10 for v in row]])
    blocks, scales = mxfp4.quantize(w)
    assert scales.tolist() == [[127], [117]]
    packed = [codes[2 * i] | codes[2 * i + 1] << 4 for i in range(16)]
    assert blocks.tolist() == [packed, packed]
    assert blocks[0, 0].item() == 0x57
    values = [6, 3, -1.5, 0, 1, 1, 2, 2, 4, 4, 6, 0, 0.5, -6, 4, 1] + [0.0] * 16
    assert mxfp4.dequantize(blocks, scales)[0].tolist() == values


def test_quantize_zero_padding_and_round_trip():
    """An all-zero block gets exponent code 0 and zero codes; K = 40 pads to 2 blocks; the
    dequantized values of any codes quantize back to the same values."""
    w = torch.zeros(2, 40)
    w[1, 35] = 3.0
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (2, 32) and scales.tolist() == [[0, 0], [0, 127 + 1 - 2]]
    assert torch.equal(mxfp4.dequantize(blocks, scales, 40), w)
    b, s = random_codes(16, 3, seed=4)
    d = mxfp4.dequantize(b, s)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(d)), d)


def test_quantization_error_is_that_of_4_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    err = (mxfp4.dequantize(*mxfp4.quantize(w), 256) - w).norm() / w.norm()
    assert 0.05 < err < 0.15, err


@pytest.fixture(params=["native", "torch"])
def native(request):
    """Run a test with the C kernel, then with the torch fallback."""
    if request.param == "native" and not kernels.native_available():
        pytest.skip(f"C kernel unavailable: {kernels.native_error()}")
    kernels.use_native(request.param == "native")
    yield request.param
    kernels.use_native(True)


@pytest.mark.parametrize("n,k,m", [(40, 64, 1), (600, 70, 3), (37, 96, 4), (50, 40, 6), (1100, 32, 5),
                                   (300, 64, 70)])
def test_kernel_matches_float_matmul(native, n, k, m):
    """The C kernel's row variants (1-4 activation rows and a remainder), padded rows
    (k % 32 != 0), the large-batch dequantize + matmul path (m = 70) and the torch
    fallback, with fp32 and bf16 activations and outputs."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    blocks, scales = mxfp4.quantize(w)
    mat = mxfp4.MXFP4Matrix(blocks, scales, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    want = x @ mxfp4.dequantize(blocks, scales, k).T
    torch.testing.assert_close(mxfp4.mxfp4_mm(x, mat), want, atol=1e-4, rtol=1e-5)
    got = mxfp4.mxfp4_mm(x.bfloat16(), mat, torch.float32)
    # bf16 activations in a large batch may take a bf16 matmul (CPUs with bf16 units).
    bf16_matmul = native == "native" and m > kernels.packed_max_batch("int16") and kernels.MATMUL_DTYPE == torch.bfloat16
    torch.testing.assert_close(got, x.bfloat16().float() @ mxfp4.dequantize(blocks, scales, k).T,
                               atol=0.05 if bf16_matmul else 1e-3, rtol=1e-2 if bf16_matmul else 1e-5)
    out = mxfp4.mxfp4_mm(x.bfloat16(), mat)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), got, atol=0.05, rtol=1e-2)
    torch.testing.assert_close(mxfp4.dequant_rows(mat, 1, n, torch.bfloat16).float(),
                               mxfp4.dequantize(blocks, scales, k)[1:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="columns"):
        mxfp4.mxfp4_mm(torch.zeros(1, k + 1), mat)


def test_format_layout_encode_and_expert_with_biases():
    H, I = 64, 40  # I is not a multiple of 32: the down rows pad to 2 blocks
    fmt = get_format("mxfp4")
    assert fmt is mxfp4.FORMAT and fmt.bits_per_weight(64, 96) == 4.25
    assert [(s.name, s.shape) for s in fmt.layout(H, I)] == [
        ("w13.blocks", (80, 32)), ("w13.scales", (80, 2)), ("w2.blocks", (64, 32)), ("w2.scales", (64, 2))]
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g)
    b13, b2 = torch.randn(2 * I, generator=g), torch.randn(H, generator=g)
    parts = fmt.encode(gate, up, down)
    expert = fmt.expert({**parts, "b13": b13, "b2": b2}, "swiglu_clamped", torch.float32)
    deq = [mxfp4.dequantize(parts[f"{n}.blocks"], parts[f"{n}.scales"], k) for n, k in (("w13", H), ("w2", I))]
    dense = DenseExpert.from_stacked(deq[0], deq[1], "swiglu_clamped", b13, b2)
    x = torch.randn(5, H, generator=g) * 3
    torch.testing.assert_close(expert(x), dense(x), atol=1e-4, rtol=1e-5)
    plain = fmt.expert(parts, "swiglu_clamped", torch.float32)
    assert not torch.allclose(plain(x), expert(x))
    # Codes given as codes are stored as they are.
    gb, gs = mxfp4.quantize(gate)
    ub, us = mxfp4.quantize(up)
    db, ds = mxfp4.quantize(down)
    codes = {"gate_blocks": gb.view(I, 2, 16), "gate_scales": gs, "up_blocks": ub.view(I, 2, 16), "up_scales": us,
             "down_blocks": db.view(H, 2, 16), "down_scales": ds}
    for name, t in fmt.encode_codes(codes).items():
        assert torch.equal(t, parts[name]), name
    with pytest.raises(StoreError, match="w2.scales"):
        fmt.expert({**parts, "w2.scales": parts["w2.scales"][:, :1].contiguous()}, "silu", torch.float32)
