"""Packed matmul kernels against the dequantized reference, every path and batch size."""

from __future__ import annotations

import pytest
import torch

from edgemoe.quant import kernels as K
from edgemoe.quant import native as N
from edgemoe.quant.quantize import QuantSpec, dequantize, pack, quantize

from .refs import act8, check_path

SHAPES = [(96, 64), (64, 96), (256, 128), (384, 192), (130, 300)]  # (N, K), K padded when odd
BATCHES = [1, 7, 33]


def make(n: int, k: int, spec: QuantSpec, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qz = quantize(w, spec, search=False)
    return K.QMatrix(pack(qz.q, spec.bits), qz.scale, qz.zero, spec, k), dequantize(qz)


def assert_matches_path(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, rtol: float):
    """The packed kernels quantize activations (int8 by default, see kernels.ACTIVATIONS):
    compare with the reference of the path in use; rtol applies to the int16 path."""
    if K.ACTIVATIONS == "int8":
        check_path(y, x, wd, "int8")
    else:
        assert_matches(y, x, wd, rtol)


def assert_matches(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, rtol: float):
    """y within rtol of x @ wd^T, relative to |x| @ |wd|^T (the scale of each sum)."""
    ref = x.double() @ wd.double().t()
    bound = x.double().abs() @ wd.double().abs().t()
    err = (y.double() - ref).abs()
    assert bool((err <= rtol * bound + 1e-6).all()), float((err / bound).max())


@pytest.fixture(autouse=True)
def native_on():
    K.use_native(True)
    prev = K.ACTIVATIONS
    yield
    K.use_native(True)
    K.set_activations(prev)


def need_native():
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")


@pytest.mark.parametrize("act", ["int8", "int16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_kernel_matches_reference(bits, asym, shape, act):
    need_native()
    n, k = shape
    w, wd = make(n, k, QuantSpec(bits, 64, asym))
    for m in BATCHES:
        x = torch.randn(m, k)
        # int16 activations: ~1e-4 of the sum's scale; int8: exact against act8's activations
        check_path(K.qmm_packed(x, w, torch.float32, act=act), x, wd, act)


@pytest.mark.parametrize("group", [128, 256])
def test_larger_groups(group):
    need_native()
    w, wd = make(200, 512, QuantSpec(3, group, True), seed=1)
    x = torch.randn(5, 512)
    assert_matches_path(K.qmm(x, w, torch.float32), x, wd, 5e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_dtypes(dtype):
    need_native()
    w, wd = make(256, 192, QuantSpec(4, 64))
    x = torch.randn(3, 192).to(dtype)
    y = K.qmm(x, w)
    assert y.dtype == dtype and y.shape == (3, 256)
    xr = act8(x.float()) if K.ACTIVATIONS == "int8" else x.float()
    assert_matches(y.float(), xr, wd, 5e-4 if dtype == torch.float32 else 1e-2)


def test_dequant_rows_is_exact():
    need_native()
    for spec in (QuantSpec(2, 64), QuantSpec(3, 128, True), QuantSpec(4, 64, True)):
        w, wd = make(70, 200, spec)
        assert torch.equal(K.dequant_rows(w, 0, 70), wd)
        assert torch.equal(K.dequant_rows(w, 10, 33), wd[10:33])
        assert torch.equal(K.dequant_rows(w, 0, 70, torch.bfloat16), wd.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batch_path(dtype, monkeypatch):
    """Dequantize + matmul, in fp32 (AVX2 CPUs) or bf16 (CPUs with AMX / AVX512-BF16)."""
    need_native()
    monkeypatch.setattr(K, "PACKED_MAX_BATCH", 8)
    monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU", 8)
    monkeypatch.setattr(K, "MATMUL_DTYPE", dtype)
    monkeypatch.setattr(K, "DEQUANT_ROWS", 64)  # several chunks
    w, wd = make(150, 128, QuantSpec(2, 64, True))
    x = torch.randn(20, 128)
    assert_matches(K.qmm(x, w, torch.float32), x, wd, 1e-5 if dtype == torch.float32 else 1e-2)


def test_dequant_rows_bf16_on_the_large_batch_path():
    need_native()
    w, wd = make(64, 128, QuantSpec(3, 64, True))
    assert torch.equal(K.dequant_rows(w, 0, 64, torch.bfloat16), wd.bfloat16())


def test_torch_fallback_without_native():
    K.use_native(False)
    assert not K.native_available()
    for bits in (2, 3, 4):
        w, wd = make(100, 96, QuantSpec(bits, 64, bits == 2))
        for m in (1, 9):
            x = torch.randn(m, 96)
            assert_matches(K.qmm(x, w, torch.float32), x, wd, 1e-5)


def test_missing_compiler_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(N.shutil, "which", lambda name: None)
    native = N.Library()
    monkeypatch.setattr(N, "library", native)
    assert native.get() is None and "no C compiler" in native.error
    w, wd = make(64, 64, QuantSpec(4, 64))
    x = torch.randn(2, 64)
    assert_matches(K.qmm(x, w, torch.float32), x, wd, 1e-5)


def test_bad_shapes_are_rejected():
    need_native()
    w, _ = make(64, 96, QuantSpec(4, 64))
    with pytest.raises(ValueError):
        K.qmm_packed(torch.randn(1, 64), w)


@pytest.mark.parametrize("path", ["native", "int8pack", "dequant"])
@pytest.mark.parametrize("k", [128, 72])  # 72: not a multiple of 64, never native or int8pack
@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_mm_matches_reference(m, k, path, monkeypatch):
    monkeypatch.setattr(K, "INT8PACK_PREFERRED", False)
    if path == "native":
        need_native()
        monkeypatch.setattr(K, "INT8_NATIVE_MAX_BATCH", 1 << 20)
        monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU", 1 << 20)
    else:
        K.use_native(False)
        monkeypatch.setattr(K, "INT8PACK_MAX_BATCH", 1 << 20 if path == "int8pack" else 0)
    dequant_bf16 = K.MATMUL_DTYPE == torch.bfloat16 and m > K.packed_max_batch() and (path == "dequant" or k % 64)
    torch.manual_seed(0)
    for scale_dtype in (torch.bfloat16, torch.float32):
        w = K.quantize_int8(torch.randn(120, k) * 0.05, scale_dtype)
        wd = w.q.float() * w.scale.float()[:, None]
        x = torch.randn(m, k)
        rtol = 1e-2 if dequant_bf16 else 5e-4 if path == "native" and k % 64 == 0 else 1e-5
        if path == "native" and k % 64 == 0 and not dequant_bf16:
            assert_matches_path(K.int8_mm(x, w, torch.float32), x, wd, rtol)
        else:
            assert_matches(K.int8_mm(x, w, torch.float32), x, wd, rtol)
        y = K.int8_mm(x.bfloat16(), w)
        assert y.dtype == torch.bfloat16
        assert_matches(y.float(), x.bfloat16().float(), wd, 1e-2)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_int8_dequant_in_c_is_exact(scale_dtype, out_dtype, monkeypatch):
    """The large-batch int8 path dequantizes in C (em_dequant8): bit for bit what torch's
    cast-multiply-cast gives, chunked (DEQUANT_ROWS smaller than N) or not; fp16 scales
    take the torch path."""
    need_native()
    torch.manual_seed(0)
    w = K.quantize_int8(torch.randn(300, 192) * 0.05, scale_dtype)
    lib = N.get()
    buf = torch.empty(300, 192, dtype=out_dtype)
    for n0, n1 in ((0, 300), (7, 129)):
        ref = (w.q[n0:n1].float() * w.scale[n0:n1].float().unsqueeze(1)).to(out_dtype)
        assert torch.equal(K._dequant8_rows(lib, w, n0, n1, out_dtype, buf), ref)
    monkeypatch.setattr(K, "INT8_NATIVE_MAX_BATCH", 0)
    monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU_INT16", 0)
    monkeypatch.setattr(K, "DEQUANT_ROWS", 128)
    x = torch.randn(40, 192)
    y = K.int8_mm(x, w, torch.float32)
    K.use_native(False)
    try:
        assert torch.equal(y, K.int8_mm(x, w, torch.float32))
    finally:
        K.use_native(True)


def test_portable_c_path():
    """The plain-C inner loops (what CPUs without a SIMD variant get), via the dispatcher;
    tests/quant/test_isa_paths.py covers every variant."""
    need_native()
    N.set_isa("generic")
    try:
        for bits in (2, 3, 4):
            w, wd = make(130, 300, QuantSpec(bits, 64, bits == 3))
            for m in (1, 6):
                x = torch.randn(m, 300)
                for act in ("int8", "int16"):
                    check_path(K.qmm_packed(x, w, torch.float32, act=act), x, wd, act)
        w8 = K.quantize_int8(torch.randn(70, 192))
        x = torch.randn(5, 192)
        for act in ("int8", "int16"):
            check_path(K._int8_native(N.get(), x, w8, torch.float32, act=act), x,
                       w8.q.float() * w8.scale.float()[:, None], act)
    finally:
        N.set_isa(None)
