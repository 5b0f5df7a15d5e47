"""Expert formats: names, layouts, encode, and experts built from zero-copy views equal to
the dequantized-reference DenseExpert."""

from __future__ import annotations

import pytest
import torch

from edgemoe.errors import EdgeMoEError, StoreError
from edgemoe.experts import DenseExpert
from edgemoe.quant import kernels as K
from edgemoe.quant.experts import GroupwiseFormat, Int8Format
from edgemoe.quant.formats import FORMATS, get_format
from edgemoe.quant.quantize import QuantSpec, dequantize, unpack

from .refs import RTOL_INT8_EXACT, act8, act8_step, assert_matches

QUANT = ["int8", "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym"]
SHAPES = [(64, 96), (128, 256), (192, 384)]  # (hidden, inter): odd, and tiny-model sizes


def weights(hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g) * 0.05 for s in ((inter, hidden), (inter, hidden), (hidden, inter)))


def to_slab(fmt, parts: dict[str, torch.Tensor], hidden: int, inter: int, align: int = 64):
    """Lay the encoded tensors out the way the expert store does (one aligned blob, in
    layout order) and return the slab and zero-copy views into it."""
    specs = fmt.layout(hidden, inter)
    offsets, off = [], 0
    for s in specs:
        off = -(-off // align) * align
        offsets.append(off)
        off += s.nbytes
    slab = torch.zeros(off, dtype=torch.uint8)
    views = {}
    for s, o in zip(specs, offsets):
        slab[o : o + s.nbytes] = parts[s.name].contiguous().view(-1).view(torch.uint8)
        views[s.name] = slab[o : o + s.nbytes].view(s.dtype).view(s.shape)
    return slab, views


def reference(fmt, parts, hidden, inter) -> DenseExpert:
    """DenseExpert in fp32 over the dequantized stored weights."""
    if isinstance(fmt, Int8Format):
        w13 = parts["w13.q"].float() * parts["w13.s"].float()[:, None]
        w2 = parts["w2.q"].float() * parts["w2.s"].float()[:, None]
    else:
        from edgemoe.quant.quantize import Quantized

        def dq(name, k):
            q = unpack(parts[f"{name}.q"], fmt.spec.bits)
            return dequantize(Quantized(q, parts[f"{name}.s"], parts.get(f"{name}.z"), fmt.spec, k))

        w13, w2 = dq("w13", hidden), dq("w2", inter)
    return DenseExpert.from_stacked(w13, w2, "silu")


def check_int8_stages(expert, fmt, parts, hidden, inter, x):
    """The expert as the int8-activation kernels compute it, stage by stage and exactly:
    gate/up = act8(x) @ w13^T, then down = act8(glu(gate, up)) @ w2^T on the kernel's own
    gate/up (so a value on a rounding boundary cannot land on the other side)."""
    dense = reference(fmt, parts, hidden, inter)

    def staged(v, k):
        """int8 weights take the C kernel only when K is a multiple of 64; otherwise a float
        matmul, in bf16 above packed_max_batch() on CPUs with bf16 units."""
        if not isinstance(fmt, Int8Format) or k % K.INT8_XGROUP == 0:
            return act8(v), RTOL_INT8_EXACT
        bf16 = K.MATMUL_DTYPE == torch.bfloat16 and v.shape[0] > K.packed_max_batch()
        return v, 1e-2 if bf16 else 1e-5

    h = expert._mm(x, expert.w13, torch.float32)  # (m, 2I)
    xr, rtol = staged(x, hidden)
    assert_matches(h, xr, dense.w13, rtol)
    a = expert.glu(*h.chunk(2, dim=-1))  # (m, I)
    ar, rtol = staged(a, inter)
    y = expert(x)
    if expert._fused is not None and K.fused_ok(x.shape[0], expert.w13):
        # One C call (em_expert8): its activation function (expf) may differ from torch's by
        # an ulp, which moves a value on an int8 rounding boundary by one int8 step. Allow
        # up to two such steps per row on top of the exact tolerance.
        step = act8_step(a).double()  # (m, I)
        flip = (step.unsqueeze(1) * dense.w2.double().abs().unsqueeze(0)).amax(-1)  # (m, H) largest one-step change
        ref = ar.double() @ dense.w2.double().t()
        bound = ar.double().abs() @ dense.w2.double().abs().t()
        assert bool(((y.double() - ref).abs() <= rtol * bound + 2 * flip + 1e-6).all())
    else:
        assert_matches(y, ar, dense.w2, rtol)


def int8_path(name: str, m: int) -> bool:
    """Whether an expert call of this format and batch runs the int8-activation C kernels."""
    if not K.native_available() or K.ACTIVATIONS != "int8":
        return False
    if name == "int8":
        return not K.INT8PACK_PREFERRED and m <= K.INT8_NATIVE_MAX_BATCH
    return m <= K.packed_max_batch()


# Expert error against the float reference, relative to the largest output: int16
# activations ~1e-4; int8 ones up to ~2% on these small random experts (two matmuls, 64-
# element activation blocks), which check_int8_stages then pins down exactly.
INT8_EXPERT_TOL = 4e-2


def tensors_of(expert):
    for mat in (expert.w13, expert.w2):
        for t in vars(mat).values():
            if isinstance(t, torch.Tensor):
                yield t


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("shape", SHAPES)
def test_expert_from_views_matches_dequantized_reference(name, shape):
    hidden, inter = shape
    fmt = get_format(name)
    parts = fmt.encode(*weights(hidden, inter))
    specs = fmt.layout(hidden, inter)
    assert [s.name for s in specs] == list(parts)
    for s in specs:
        assert parts[s.name].dtype == s.dtype and tuple(parts[s.name].shape) == s.shape, s
    slab, views = to_slab(fmt, parts, hidden, inter)
    expert = fmt.expert(views, "silu", torch.bfloat16)
    # Zero-copy: the expert computes from the slab and owns nothing of its own.
    lo, hi = slab.data_ptr(), slab.data_ptr() + slab.numel()
    assert all(lo <= t.data_ptr() < hi for t in tensors_of(expert))
    assert expert.nbytes == sum(s.nbytes for s in specs)

    ref = reference(fmt, parts, hidden, inter)
    for m in (1, 7, 33):
        x = torch.randn(m, hidden)
        want = ref(x)  # (m, H) fp32
        got = expert(x)
        assert got.shape == (m, hidden) and got.dtype == torch.float32
        err = float((got - want).abs().max() / want.abs().max())
        # CPUs with bf16 matrix units run large batches as dequantize + bf16 matmul
        act8_path = int8_path(name, m)
        bf16_path = K.MATMUL_DTYPE == torch.bfloat16 and m > K.packed_max_batch() and not act8_path
        assert err < (INT8_EXPERT_TOL if act8_path else 2e-2 if bf16_path else 2e-3), (m, err)
        if act8_path:
            check_int8_stages(expert, fmt, parts, hidden, inter, x)
        got16 = expert(x.bfloat16())
        assert got16.dtype == torch.bfloat16
        err16 = float((got16.float() - want).abs().max() / want.abs().max())
        assert err16 < (INT8_EXPERT_TOL if act8_path else 3e-2), (m, err16)


def test_fallback_expert_matches_native():
    fmt = get_format("int3")
    hidden, inter = 128, 256
    parts = fmt.encode(*weights(hidden, inter, seed=5))
    x = torch.randn(4, hidden)
    fast = fmt.expert(parts, "silu", torch.float32)(x)
    K.use_native(False)
    try:
        slow = fmt.expert(parts, "silu", torch.float32)(x)
    finally:
        K.use_native(True)
    assert float((fast - slow).abs().max() / slow.abs().max()) < (INT8_EXPERT_TOL if int8_path("int3", 4) else 2e-3)


def test_big_expert_shape():
    """A ~1B-model expert (hidden 2048, inter 1408), batch 1 and 9, 4- and 2-bit."""
    hidden, inter = 2048, 1408
    w = weights(hidden, inter, seed=3)
    for name in ("int4", "int2-asym"):
        fmt = get_format(name)
        parts = fmt.encode(*w)
        expert, ref = fmt.expert(parts, "silu", torch.float32), reference(fmt, parts, hidden, inter)
        for m in (1, 9):
            x = torch.randn(m, hidden)
            want = ref(x)
            tol = INT8_EXPERT_TOL if int8_path(name, m) else 2e-3
            assert float((expert(x) - want).abs().max() / want.abs().max()) < tol
            if int8_path(name, m):
                check_int8_stages(expert, fmt, parts, hidden, inter, x)


def test_bits_per_weight_is_exact():
    h, i = 4096, 14336
    want = {"int4": 4.25, "int4-asym": 4.5, "int3": 3.25, "int3-asym": 3.5, "int2": 2.25, "int2-asym": 2.5,
            "int3-g128": 3.125, "int2-asym-g128": 2.25}
    for name, bpw in want.items():
        assert get_format(name).bits_per_weight(h, i) == pytest.approx(bpw, abs=1e-12), name
    # The code tensors alone: exactly b bits per weight (3-bit packs 3 bits, not 4).
    for b in (2, 3, 4):
        q = [s for s in get_format(f"int{b}").layout(h, i) if s.name.endswith(".q")]
        assert sum(s.nbytes for s in q) * 8 == b * 3 * h * i
    assert get_format("int8").bits_per_weight(h, i) == pytest.approx(8 + 16 * (2 * i + h) / (3 * h * i))


def test_names_round_trip():
    for name, fmt in FORMATS.items():
        assert fmt.name == name and get_format(name) is fmt
        assert fmt.tag() == ""  # portable layouts: no CPU-specific packing
    for name in ("int4-g128", "int3-asym-g256", "int2-g1024"):
        fmt = get_format(name)
        assert fmt.name == name and get_format(fmt.name) is fmt
    assert get_format("int4-g64") is get_format("int4")  # spelled-out default group
    assert isinstance(get_format("int2-asym"), GroupwiseFormat) and get_format("int2-asym").spec == QuantSpec(2, 64, True)


@pytest.mark.parametrize("bad", ["int5", "int4-g32", "int4-g100", "int8-asym", "int4_asym", "INT4", "int4-g0"])
def test_bad_names_raise(bad):
    with pytest.raises(EdgeMoEError, match=bad):
        get_format(bad)


def test_layout_depends_only_on_shape():
    for name in QUANT:
        fmt = get_format(name)
        a, b = fmt.layout(192, 384), fmt.layout(192, 384)
        assert a == b
        parts = fmt.encode(*weights(192, 384, seed=9))
        assert sum(t.nbytes for t in parts.values()) == sum(s.nbytes for s in a)


def test_mismatched_parts_are_refused():
    hidden, inter = 64, 96
    for name in ("int4", "int8"):
        fmt = get_format(name)
        parts = fmt.encode(*weights(hidden, inter))
        other = get_format("int3" if name == "int4" else "int4").encode(*weights(hidden, inter))
        wrong = dict(parts, **{"w13.q": other["w13.q"]})
        with pytest.raises(StoreError, match="w13.q"):
            fmt.expert(wrong, "silu", torch.float32)
        missing = {k: v for k, v in parts.items() if k != "w2.s"}
        with pytest.raises(StoreError, match="missing"):
            fmt.expert(missing, "silu", torch.float32)


@pytest.mark.parametrize("act,code", [("silu", 0), ("gelu", 1), ("gelu_pytorch_tanh", 2), ("relu", 3)])
def test_glu_rows_one_pass_matches_torch(act, code):
    """The large-batch gated activation in one C pass: act(gate) * up as the torch ops give
    it (fp32 to a few ulps, and 1e-5 absolute where erf's tail cancels against 1; bf16
    within one rounding step)."""
    from edgemoe.experts import glu
    from edgemoe.quant.experts import _glu_rows

    if K.native.get() is None:
        pytest.skip("C kernel unavailable")
    g = torch.Generator().manual_seed(7)
    h = torch.randn(40, 2 * 96, generator=g) * 4  # (N, 2I) gate | up
    h[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # exp's clamps, and signed zero
    ref = glu(act)(*h.chunk(2, dim=-1))  # (N, I) fp32
    got = _glu_rows(h, code, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got16 = _glu_rows(h, code, torch.bfloat16)
    assert got16.dtype == torch.bfloat16
    ulp = ref.abs().clamp_min(1e-30) * 2**-7
    assert ((got16.float() - ref.to(torch.bfloat16).float()).abs() <= ulp * 1.01 + 1e-5).all()
    assert _glu_rows(h.requires_grad_(), code, torch.float32) is None  # autograd: the torch ops


def test_large_batch_expert_takes_the_one_pass_activation(monkeypatch):
    import edgemoe.quant.experts as QE

    if K.native.get() is None:
        pytest.skip("C kernel unavailable")
    fmt = get_format("int4")
    hidden, inter = 128, 256
    expert = fmt.expert(fmt.encode(*weights(hidden, inter, seed=9)), "silu", torch.bfloat16)
    x = torch.randn(K.packed_max_batch() + 9, hidden).bfloat16()  # a batch past the packed kernels
    calls = []
    real = QE._glu_rows
    monkeypatch.setattr(QE, "_glu_rows", lambda *a: calls.append(a[2]) or real(*a))
    fast = expert(x)
    assert calls == [QE._down_input_dtype(x.shape[0], expert.w2)]
    monkeypatch.setattr(QE, "_glu_rows", lambda *a: None)  # the torch ops instead
    slow = expert(x)
    assert float((fast.float() - slow.float()).abs().max() / slow.float().abs().max()) < 1e-2
