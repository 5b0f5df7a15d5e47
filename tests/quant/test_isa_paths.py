"""Every instruction-set variant of the C kernels, with int8 and int16 activations, against
the dequantize-matmul reference; the run-time dispatch; and the portability of the build.

Variants this CPU lacks are skipped with the reason. tests/quant/arm/ runs the AArch64
variants (NEON, dotprod) under qemu-user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgemoe.quant import kernels as K
from edgemoe.quant import mxfp4
from edgemoe.quant import native as N
from edgemoe.quant.quantize import QuantSpec, dequantize, pack, quantize

from .refs import RTOL_INT8_EXACT, act8, assert_matches, check_path

X86 = N.arch() == "x86_64"
SHAPES = [(96, 64, 64), (130, 300, 64), (64, 512, 128), (33, 256, 256)]  # (N, K, group); 300: padded
BATCHES = [1, 2, 3, 4, 5, 9]  # every row-block size (1-4) and remainders


def cpu_flags() -> set[str]:
    return set(N.cpu_id().split())


@pytest.fixture(autouse=True)
def restore():
    K.use_native(True)
    prev = K.ACTIVATIONS
    yield
    K.use_native(True)
    K.set_activations(prev)
    if N.get() is not None:
        N.set_isa(None)


def need_isa(name: str):
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    if name not in [n for n, _ in N.variants_for()]:
        pytest.skip(f"variant {name} is not built on {N.arch()} (tests/quant/arm/ covers AArch64 under qemu)")
    if not N.isa_supported(name):
        missing = {"avx2": "AVX2/FMA/F16C", "avxvnni": "AVX-VNNI", "avx512vnni": "AVX-512 F/BW/VL/DQ + VNNI"}
        pytest.skip(f"this CPU lacks {missing.get(name, name)} (it runs: {', '.join(N.supported_isas())})")
    N.set_isa(name)


def make(n, k, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qz = quantize(w, spec, search=False)
    return K.QMatrix(pack(qz.q, spec.bits), qz.scale, qz.zero, spec, k), dequantize(qz)


ISAS = ["generic", "avx2", "avxvnni", "avx512vnni"] if X86 else [n for n, _ in N.variants_for()]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["int8", "int16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("asym", [False, True])
def test_groupwise_every_isa(isa, act, bits, asym):
    need_isa(isa)
    for n, k, group in SHAPES:
        w, wd = make(n, k, QuantSpec(bits, group, asym), seed=n + k)
        for m in BATCHES:
            x = torch.randn(m, k)
            check_path(K.qmm_packed(x, w, torch.float32, act=act), x, wd, act)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["int8", "int16"])
def test_int8_weights_every_isa(isa, act):
    need_isa(isa)
    lib = N.get()
    torch.manual_seed(0)
    for k in (64, 192, 320):
        for sdt in (torch.bfloat16, torch.float32, torch.float16):
            w = K.quantize_int8(torch.randn(70, k) * 0.05, sdt)
            wd = w.q.float() * w.scale.float()[:, None]
            for m in (1, 3, 4, 6):
                x = torch.randn(m, k)
                check_path(K._int8_native(lib, x, w, torch.float32, act=act), x, wd, act)
    # the extremes of the int8 range: -127 and 127 codes, activations at +-absmax
    w = K.Int8Matrix(torch.tensor([[127, -127] * 32, [-127] * 64], dtype=torch.int8), torch.ones(2))
    x = torch.tensor([[1.0, -1.0] * 32, [-3.0] * 64])
    check_path(K._int8_native(lib, x, w, torch.float32, act=act), x, w.q.float(), act)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["int8", "fp32"])
def test_mxfp4_every_isa(isa, act):
    need_isa(isa)
    lib = N.get()
    for n, k in ((40, 64), (37, 96), (50, 40), (300, 70)):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
        blocks, scales = mxfp4.quantize(w)
        mat = mxfp4.MXFP4Matrix(blocks, scales, k)
        wd = mxfp4.dequantize(blocks, scales, k)
        for m in (1, 2, 3, 4, 6):
            x = torch.randn(m, k)
            y = mxfp4._mm_native(lib, x, mat, torch.float32, act=act)
            if act == "int8":  # one activation scale per 32-block
                assert_matches(y, act8(x, 32), wd, RTOL_INT8_EXACT)
            else:  # fp32 activations: a float matmul summed in another order
                torch.testing.assert_close(y, x @ wd.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_dtypes_and_bf16_output(isa):
    need_isa(isa)
    w, wd = make(256, 192, QuantSpec(4, 64))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(3, 192).to(dtype)
        y = K.qmm_packed(x, w, act="int8")
        assert y.dtype == dtype and y.shape == (3, 256)
        assert_matches(y.float(), act8(x.float()), wd, RTOL_INT8_EXACT if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_activation_error_is_bounded(isa):
    """Against the float reference the int8 path errs by at most half an activation step
    per element: |err| <= sum_k |w_k| * absmax_block / 254, per output."""
    need_isa(isa)
    w, wd = make(128, 512, QuantSpec(4, 64, True))
    x = torch.randn(5, 512) * torch.linspace(0.1, 3, 512)  # blocks of different ranges
    y = K.qmm_packed(x, w, torch.float32, act="int8")
    amax = x.view(5, 8, 64).abs().amax(-1).repeat_interleave(64, dim=1)  # (5, 512)
    bound = (amax / 254).double() @ wd.abs().double().t()
    err = (y.double() - x.double() @ wd.double().t()).abs()
    assert bool((err <= bound * 1.001 + 1e-6).all())


def test_isas_agree_bit_for_bit_on_integer_sums():
    """Every variant computes the same integer sums; only the order of the float folds
    differs, so they agree to float rounding."""
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    w, _ = make(300, 1024, QuantSpec(3, 64, True))
    x = torch.randn(7, 1024)
    outs = {}
    for isa in N.supported_isas():
        N.set_isa(isa)
        outs[isa] = K.qmm_packed(x, w, torch.float32, act="int8")
    ref = outs["generic"]
    for isa, y in outs.items():
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5, msg=isa)


# ----------------------------------------------------------------------------- dispatch


def expected_best(flags: set[str]) -> str:
    if X86:
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags:
            return "avx512vnni"
        if {"avx2", "fma", "f16c", "avx_vnni"} <= flags:
            return "avxvnni"
        if {"avx2", "fma", "f16c"} <= flags:
            return "avx2"
        return "generic"
    if N.arch() == "aarch64":
        return "dotprod" if "asimddp" in flags else "neon"
    return "generic"


def test_dispatch_picks_the_best_variant_for_this_cpu():
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    flags = cpu_flags()
    assert N.best_isa() == expected_best(flags)
    assert N.isa() == N.best_isa()  # what the library runs after loading (no EDGEMOE_ISA in tests)
    cpu = set(N.cpu_isas())
    if X86:  # CPUID as dispatch.c reads it agrees with the kernel's /proc/cpuinfo flags
        assert ("avx2" in cpu) == ({"avx2", "fma", "f16c"} <= flags)
        assert ("avxvnni" in cpu) == ({"avx2", "fma", "f16c", "avx_vnni"} <= flags)
        assert ("avx512vnni" in cpu) == ({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags)
    assert "generic" in N.supported_isas()


def test_set_isa_refuses_what_the_cpu_lacks():
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    with pytest.raises(ValueError, match="unknown"):
        N.set_isa("sse9")
    other = "neon" if X86 else "avx2"
    with pytest.raises(ValueError, match="not usable"):
        N.set_isa(other)
    assert N.set_isa("generic") == "generic" and N.isa() == "generic"
    assert N.set_isa(None) == N.best_isa()


def test_env_var_picks_the_variant_at_load():
    """EDGEMOE_ISA=generic in a fresh process: the same cached library runs the generic
    variant; an unusable name falls back to the best with a warning."""
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    code = "from edgemoe.quant import native as N; N.get(); print(N.isa())"
    for value, want in (("generic", "generic"), ("nonsense", N.best_isa())):
        env = {**os.environ, "EDGEMOE_ISA": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want


def test_activation_env_and_setter():
    code = "from edgemoe.quant import kernels as K; print(K.ACTIVATIONS)"
    for value, want in (("int16", "int16"), ("int8", "int8"), ("", K.DEFAULT_ACTIVATIONS)):
        env = {**os.environ, "EDGEMOE_QMM_ACT": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip() == want, out.stderr
    assert K.set_activations("int16") in K.ACT_PATHS and K.ACTIVATIONS == "int16"
    with pytest.raises(ValueError):
        K.set_activations("int4")


def test_default_path_is_the_configured_one():
    """qmm() without `act` follows ACTIVATIONS, for group-wise, int8 and MXFP4 weights."""
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    w, wd = make(64, 128, QuantSpec(4, 64))
    x = torch.randn(2, 128)
    for act in ("int8", "int16"):
        K.set_activations(act)
        assert torch.equal(K.qmm(x, w, torch.float32), K.qmm_packed(x, w, torch.float32, act=act))
    lib = N.get()
    b, s = mxfp4.quantize(torch.randn(64, 128))
    mat = mxfp4.MXFP4Matrix(b, s, 128)
    assert mxfp4.ACTIVATIONS == "fp32"  # the default: gpt-oss keeps transformers' float products
    prev = mxfp4.ACTIVATIONS
    try:
        for act in ("int8", "fp32"):
            mxfp4.set_activations(act)
            assert torch.equal(mxfp4.mxfp4_mm(x, mat, torch.float32), mxfp4._mm_native(lib, x, mat, torch.float32, act=act))
    finally:
        mxfp4.set_activations(prev)


# ----------------------------------------------------------------------------- portability


def test_build_is_not_tuned_to_this_machine():
    """No -march=native anywhere, the cache key holds no CPU flags, and every variant of
    this architecture is in the library: a copy on another machine of the architecture
    dispatches to that machine's variant."""
    if not K.native_available():
        pytest.skip(f"C kernel unavailable: {K.native_error()}")
    for _, flags in N.variants_for():
        assert not any("native" in f for f in flags)
    assert not any("native" in f for f in N.BASE_FLAGS)
    lib = N.get()
    for name, _ in N.variants_for():
        assert lib.em_isa_built(N.ISAS.index(name)), f"variant {name} missing from the build"
    src = Path(N.__file__).read_text()
    assert "cpu_id(), ABI" not in src  # the old per-CPU cache key


def test_lower_variants_have_no_wider_instructions(tmp_path):
    """The generic variant and the dispatcher must run on any x86-64: their object code has
    no VEX/EVEX register (ymm/zmm) at all; the AVX2 and AVX-VNNI variants have no zmm.
    Checked on the objects the build links, compiled here with the build's own flags."""
    if not X86 or not K.native_available():
        pytest.skip("x86-64 only")
    objdump = shutil.which("objdump")
    if not objdump:
        pytest.skip("objdump not installed")
    cc = N.compiler()
    flags = N.BASE_FLAGS + ["-fopenmp"]
    built, failed, objs = N.compile_objects(cc, tmp_path, N.variants_for(), flags)
    assert not failed, failed
    disp = tmp_path / "dispatch.o"
    res = subprocess.run([cc, *flags, "-c", str(N.CSRC / N.DISPATCH_SOURCE), "-o", str(disp)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for obj in [disp, *objs]:
        dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                             timeout=300).stdout
        assert "<" in dis, obj  # disassembled something
        if obj.name.startswith(("generic-", "dispatch")):
            assert "ymm" not in dis and "zmm" not in dis, obj.name
        elif obj.name.startswith(("avx2-", "avxvnni-")):
            assert "zmm" not in dis, obj.name
            assert "ymm" in dis, obj.name
        else:
            assert "zmm" in dis, obj.name


def test_emulated_vnni_loops_on_avx2():
    """The VNNI loop structures (vpdpwssd / vpdpbusd) of the 256-bit variants, emulated with
    AVX2 instructions, so AVX2-only machines test them too."""
    need_isa("avx2")
    lib = N.load(N.build(extra={"avx2": ["-DEM_EMULATE_VNNI"]}))
    N.set_isa("avx2", lib)
    for bits in (2, 3, 4):
        w, wd = make(130, 300, QuantSpec(bits, 64, bits == 2))
        for m in (1, 3, 6):
            x = torch.randn(m, 300)
            for act in ("int8", "int16"):
                check_path(K.qmm_packed(x, w, torch.float32, lib=lib, act=act), x, wd, act)
    w8 = K.quantize_int8(torch.randn(70, 192))
    x = torch.randn(5, 192)
    for act in ("int8", "int16"):
        check_path(K._int8_native(lib, x, w8, torch.float32, act=act), x, w8.q.float() * w8.scale.float()[:, None], act)


# ----------------------------------------------------------------------------- fused expert


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["int4", "int3-asym", "int2", "int8"])
def test_fused_expert_call_matches_the_two_kernel_calls(isa, name):
    """em_expert8 (gate/up, activation, down in one C call) against the same expert computed
    by two packed-kernel calls with the activation in torch: the same int8 arithmetic, so
    equal except where torch's and C's activation functions differ by an ulp on an int8
    rounding boundary (one step of one activation)."""
    need_isa(isa)
    from edgemoe.experts import ACTIVATIONS as ACTS
    from edgemoe.quant.formats import get_format

    K.set_activations("int8")
    hidden, inter = 192, 320
    g = torch.Generator().manual_seed(7)
    fmt = get_format(name)
    parts = fmt.encode(*(torch.randn(*s, generator=g) * 0.05 for s in ((inter, hidden), (inter, hidden), (hidden, inter))))
    for act in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        e = fmt.expert(parts, act, torch.float32)
        assert e._fused is not None
        for m in (1, 3, 5):
            x = torch.randn(m, hidden, generator=g)
            y = e(x)  # fused
            h = e._mm(x, e.w13, torch.float32)  # (m, 2I), the same kernel as the fused call's first stage
            a = ACTS[act](h[:, :inter]) * h[:, inter:]
            want = e._mm(a, e.w2, torch.float32)
            err = (y - want).abs() / want.abs().max()
            assert float(err.max()) < 2e-2, (act, m)
            assert float((err < 1e-5).float().mean()) > 0.98, (act, m)
    # bf16 in and out, and the paths that do not fuse
    e = fmt.expert(parts, "silu", torch.bfloat16)
    x = torch.randn(2, hidden, generator=g).bfloat16()
    assert e(x).dtype == torch.bfloat16
    K.set_activations("int16")
    assert not K.fused_ok(1, e.w13)
    K.set_activations("int8")
    assert not K.fused_ok(K.packed_max_batch() + 1, e.w13) or name == "int8"
    assert fmt.expert({**parts, "b2": torch.zeros(hidden)}, "silu", torch.float32)._fused is None
    assert fmt.expert(parts, "swiglu_clamped", torch.float32)._fused is None
