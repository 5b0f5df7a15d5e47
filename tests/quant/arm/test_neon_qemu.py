"""The AArch64 kernels (generic C, NEON, NEON dotprod) on this machine: cross-compiled with
gcc-aarch64-linux-gnu into a static test harness (harness.c) and run under qemu-user,
against references computed here. Skipped, saying what to install, without those tools
(.ci/run installs them where apt can).

qemu's `max` CPU has the dot product instructions and `cortex-a53` has not, so the
dispatch is tested both ways: dotprod where present, the portable NEON path otherwise."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from edgemoe.quant import kernels as K
from edgemoe.quant import mxfp4
from edgemoe.quant import native as N
from edgemoe.quant.quantize import QuantSpec, dequantize, pack, quantize

from ..refs import RTOL_INT8_EXACT, RTOL_INT16, act8, assert_matches

CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
HARNESS = Path(__file__).with_name("harness.c")
ISA_ID = {name: N.ISAS.index(name) for name in ("generic", "neon", "dotprod")}
DT = {torch.float32: 0, torch.bfloat16: 1}


def tools_missing() -> str | None:
    missing = [t for t in (CC, QEMU) if shutil.which(t) is None]
    if missing:
        return (f"ARM NEON kernel tests need {' and '.join(missing)}: apt-get install -y qemu-user "
                f"gcc-aarch64-linux-gnu (.ci/run installs them)")
    return None


pytestmark = pytest.mark.skipif(tools_missing() is not None, reason=tools_missing() or "")


# ----------------------------------------------------------------------------- cases


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class Cases:
    """Kernel calls for the harness, with the reference each output is checked against."""

    def __init__(self):
        self.blob = bytearray()
        self.checks = []  # (M, N, check(y))

    def add(self, kind, x, wbytes, scale, zero, n, kp, bits, group, per_row, sdt, check):
        m, k = x.shape
        sb = _raw(scale)
        head = (kind, DT[x.dtype], m, k, n, kp, bits, group, per_row, sdt, int(zero is not None), len(sb))
        self.blob += struct.pack("<12q", *head) + _raw(x) + wbytes + sb + (_raw(zero) if zero is not None else b"")
        self.checks.append((m, n, check))


def groupwise_check(x, wd, act):
    xf = x.float()
    if act == "int8":
        return lambda y: assert_matches(y, act8(xf), wd, RTOL_INT8_EXACT)
    return lambda y: assert_matches(y, xf, wd, RTOL_INT16 if x.dtype == torch.float32 else 1e-2)


def build_cases() -> Cases:
    c = Cases()
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4):
        for asym in (False, True):
            for n, k, group in ((96, 64, 64), (130, 300, 64), (64, 512, 128)):
                spec = QuantSpec(bits, group, asym)
                qz = quantize(torch.randn(n, k, generator=g) * 0.05, spec, search=False)
                wd, wb = dequantize(qz), _raw(pack(qz.q, bits))
                for m in (1, 3, 4, 5):
                    x = torch.randn(m, k, generator=g)
                    if m == 3:
                        x = x.bfloat16()
                    for kind, act in ((0, "int16"), (1, "int8")):
                        c.add(kind, x, wb, qz.scale, qz.zero, n, spec.padded(k), bits, group, 0, 2,
                              groupwise_check(x, wd, act))
    for k in (192, 320):
        for sdt in (torch.bfloat16, torch.float32):
            w = K.quantize_int8(torch.randn(70, k, generator=g) * 0.05, sdt)
            wd = w.q.float() * w.scale.float()[:, None]
            for m in (1, 4, 6):
                x = torch.randn(m, k, generator=g)
                for kind, act in ((0, "int16"), (1, "int8")):
                    c.add(kind, x, _raw(w.q), w.scale, None, 70, k, 8, 64, 1, DT[sdt], groupwise_check(x, wd, act))
    for n, k in ((40, 64), (37, 96), (50, 40)):
        blocks, scales = mxfp4.quantize(torch.randn(n, k, generator=g))
        wd = mxfp4.dequantize(blocks, scales, k)
        for m in (1, 3, 5):
            x = torch.randn(m, k, generator=g)
            c.add(2, x, _raw(blocks), scales, None, n, 0, 4, scales.shape[1], 0, 0,
                  lambda y, x=x, wd=wd: torch.testing.assert_close(y, x @ wd.T, atol=1e-4, rtol=1e-5))
            c.add(3, x, _raw(blocks), scales, None, n, 0, 4, scales.shape[1], 0, 0,
                  lambda y, x=x, wd=wd: assert_matches(y, act8(x, 32), wd, RTOL_INT8_EXACT))
    return c


# ----------------------------------------------------------------------------- build and run


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> tuple[Path, Path, Cases]:
    work = tmp_path_factory.mktemp("arm")
    flags = [f for f in N.BASE_FLAGS if f != "-fPIC"] + ["-Wno-unknown-pragmas"]  # static, no OpenMP
    variants = N.variants_for("aarch64")
    built, failed, objs = N.compile_objects(CC, work, variants, flags)
    assert not failed, failed
    have = [f"-DEM_HAVE_{n}" for n in built if n != "generic"]
    exe = work / "harness"
    cmd = [CC, *flags, *have, "-static", "-I", str(N.CSRC), "-o", str(exe), str(HARNESS),
           str(N.CSRC / N.DISPATCH_SOURCE), *map(str, objs), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cases = build_cases()
    path = work / "cases.bin"
    path.write_bytes(bytes(cases.blob))
    return exe, path, cases


def run_qemu(harness, cpu: str, isas: list[str]):
    exe, cases_path, cases = harness
    out = cases_path.with_name(f"out-{cpu}.bin")
    env = {**os.environ, "QEMU_CPU": cpu}
    res = subprocess.run([QEMU, str(exe), str(cases_path), str(out), *(str(ISA_ID[i]) for i in isas)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split("\n")
    best = N.ISAS[int(lines[0].split()[1])]
    status = {N.ISAS[int(line.split()[1])]: line.split()[2] for line in lines[1:] if line.startswith("isa")}
    data, off, results = out.read_bytes(), 0, {}
    for isa in isas:
        if status.get(isa) != "ok":
            continue
        ys = []
        for m, n, _ in cases.checks:
            (rc,) = struct.unpack_from("<i", data, off)
            off += 4
            y = torch.frombuffer(bytearray(data[off : off + 4 * m * n]), dtype=torch.float32).view(m, n)
            off += 4 * m * n
            ys.append((rc, y))
        results[isa] = ys
    return best, status, results


def check_all(cases: Cases, ys, isa: str):
    for i, ((rc, y), (_, _, check)) in enumerate(zip(ys, cases.checks)):
        assert rc == 0, f"{isa} case {i}: rc {rc}"
        try:
            check(y)
        except AssertionError as e:
            raise AssertionError(f"{isa} case {i}: {e}") from None


def test_every_arm_variant_matches_reference_with_dotprod(harness):
    best, status, results = run_qemu(harness, "max", ["generic", "neon", "dotprod"])
    assert best == "dotprod"
    assert status == {"generic": "ok", "neon": "ok", "dotprod": "ok"}
    for isa, ys in results.items():
        check_all(harness[2], ys, isa)


def test_dispatch_falls_back_to_neon_without_dotprod(harness):
    best, status, results = run_qemu(harness, "cortex-a53", ["dotprod", "neon"])
    assert best == "neon"
    assert status == {"dotprod": "unsupported", "neon": "ok"}
    check_all(harness[2], results["neon"], "neon")
