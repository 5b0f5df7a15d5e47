"""csrc/decode.c (the decode-step ops behind edgemoe/fastops.py) on AArch64: cross-compiled
with gcc-aarch64-linux-gnu into a static harness (decode_harness.c) and run under qemu-user,
each call against the same call of this machine's build. The C code fixes its order of fp32
sums and never contracts, so both give the same bits; only libm's erff and tanhf (the two
GELU activations) may round differently."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import torch

from edgemoe.quant import native as N

from .test_neon_qemu import CC, QEMU, tools_missing

HARNESS = Path(__file__).with_name("decode_harness.c")
DT = {torch.float32: 0, torch.bfloat16: 1}

pytestmark = pytest.mark.skipif(tools_missing() is not None, reason=tools_missing() or "")


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _bits(f: float) -> int:
    return struct.unpack("<I", struct.pack("<f", f))[0]


class Records:
    """The calls for the harness, each with its inputs and the same call's outputs here."""

    def __init__(self):
        self.blob = bytearray()
        self.expected = []  # (name, [output tensors], exact)

    def add(self, head, inputs, outputs, name, exact=True):
        self.blob += struct.pack("<8q", *head, *([0] * (8 - len(head)))) + b"".join(_raw(t) for t in inputs)
        self.expected.append((name, outputs, exact))


def build_records(lib) -> Records:
    rec = Records()
    g = torch.Generator().manual_seed(11)
    for dt in (torch.float32, torch.bfloat16):
        d = DT[dt]
        for rows, H, E, k, norm in ((1, 256, 8, 2, 1), (3, 96, 64, 8, 0)):
            x = torch.randn(rows, H, generator=g).to(dt)
            w = (torch.randn(E, H, generator=g) * 0.3).to(dt)
            logits, weights = torch.empty(rows, E, dtype=dt), torch.empty(rows, k, dtype=dt)
            ids = torch.empty(rows, k, dtype=torch.int64)
            assert lib.em_route_softmax(x.data_ptr(), d, rows, H, w.data_ptr(), E, k, norm, logits.data_ptr(),
                                        weights.data_ptr(), ids.data_ptr()) == 0
            rec.add((0, d, rows, H, E, k, norm), (x, w), (logits, weights, ids), f"route {dt} E={E}")
        for k, res in ((2, True), (6, False)):
            slots = (torch.randn(k, 300, generator=g) * 20).to(dt)
            w = torch.rand(k, generator=g).to(dt)
            r = torch.randn(300, generator=g).to(dt)
            y = torch.empty(300, dtype=dt)
            assert lib.em_combine1(slots.data_ptr(), w.data_ptr(), d, k, 300, r.data_ptr() if res else None,
                                   y.data_ptr()) == 0
            rec.add((1, d, k, 300, int(res)), (slots, w, r) if res else (slots, w), (y,), f"combine {dt} k={k}")
        for act in (0, 1, 2, 3):
            h = torch.randn(5, 2 * 70, generator=g) * 4
            y = torch.empty(5, 70, dtype=dt)
            assert lib.em_glu(h.data_ptr(), 5, 70, act, y.data_ptr(), d, 1) == 0
            rec.add((2, 5, 70, act, d), (h,), (y,), f"glu {dt} act={act}", exact=act in (0, 3))
        x, w = (torch.randn(2, 200, generator=g) * 3).to(dt), torch.randn(200, generator=g).to(dt)
        y = torch.empty(2, 200, dtype=dt)
        assert lib.em_rmsnorm(x.data_ptr(), d, 2, 200, w.data_ptr(), 1e-5, y.data_ptr()) == 0
        rec.add((3, d, 2, 200, _bits(1e-5)), (x, w), (y,), f"rmsnorm {dt}")
        heads, kvh, D, S = 8, 2, 32, 37
        q, kn, vn = (torch.randn(n, D, generator=g).to(dt) for n in (heads, kvh, kvh))
        kc, vc = (torch.randn(kvh, S, D, generator=g).to(dt) for _ in range(2))
        ins = (q, kn, vn, kc.clone(), vc.clone())
        y = torch.empty(heads, D, dtype=dt)
        assert lib.em_attend1(q.data_ptr(), kn.data_ptr(), vn.data_ptr(), d, kc.data_ptr(), vc.data_ptr(), S, S - 1,
                              heads, kvh, D, D, 0.2, y.data_ptr(), 1) == 0
        rec.add((4, d, heads, kvh, D, S, _bits(0.2)), ins, (y,), f"attend {dt}")
    return rec


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    work = tmp_path_factory.mktemp("arm-decode")
    exe = work / "decode_harness"
    flags = [f for f in N.BASE_FLAGS if f != "-fPIC"] + ["-Wno-unknown-pragmas"]  # static, no OpenMP
    res = subprocess.run([CC, *flags, "-static", "-o", str(exe), str(HARNESS), str(N.CSRC / N.DECODE_SOURCE), "-lm"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return exe, work


def test_decode_ops_on_aarch64_match_this_machine(harness):
    lib = N.get()
    if lib is None:
        pytest.skip(f"C kernel unavailable here: {N.library.error}")
    exe, work = harness
    rec = build_records(lib)
    inp, outp = work / "in.bin", work / "out.bin"
    inp.write_bytes(bytes(rec.blob))
    res = subprocess.run([QEMU, str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data, off = outp.read_bytes(), 0
    for name, outputs, exact in rec.expected:
        (rc,) = struct.unpack_from("<i", data, off)
        off += 4
        assert rc == 0, f"{name}: rc {rc}"
        for want in outputs:
            n = want.numel() * want.element_size()
            raw = bytearray(data[off: off + n])
            off += n
            got = (torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16) if want.dtype == torch.bfloat16
                   else torch.frombuffer(raw, dtype=want.dtype)).view(want.shape)
            if exact:
                assert torch.equal(got, want), f"{name}: AArch64 and this machine differ"
            else:
                torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5, msg=name)
    assert off == len(data)
