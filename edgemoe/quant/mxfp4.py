"""MXFP4 expert format (OCP Microscaling spec v1.0): what gpt-oss checkpoints ship.

A weight row is cut into blocks of 32 consecutive inputs; each block holds 32 FP4 (E2M1)
codes and one shared E8M0 exponent:

    w[32 b + j] = FP4[code_j] * 2^(scale_b - 127)

    FP4 codes 0..7: +0, 0.5, 1, 1.5, 2, 3, 4, 6; codes 8..15: the same negated
    E8M0: a biased power of two, 0..254 (255 is NaN in the spec and never written here)

Codes are packed two per byte, the even element in the low nibble (as in the gpt-oss
release and transformers' `convert_moe_packed_tensors`), so one block is 16 bytes and
the format costs 4 + 8/32 = 4.25 bits per weight. Rows whose length is not a multiple of
32 are padded with zero codes.

Stored per expert (format "mxfp4"): w13.blocks (2I, G_h * 16) and w13.scales (2I, G_h)
for gate and up stacked, w2.blocks (H, G_i * 16) and w2.scales (H, G_i) for down, all
uint8 (G = ceil(K / 32)). A checkpoint already in MXFP4 is stored code for code
(`encode_codes`); float weights are quantized per the spec (`quantize`): the shared
exponent is floor(log2(max |w|)) - 2 (E2M1's largest exponent), elements round to the
nearest FP4 value with ties to even and saturate at +-6.

The kernel (`mxfp4_mm`) computes from the codes: for small batches a C kernel
(csrc/qmm.c, em_mxfp4_mm) decodes each block with a byte shuffle and multiplies it into
fp32 activations; for large batches (or without a C compiler) rows of the weight are
dequantized a chunk at a time (exact) for a float matmul. No float copy of an expert is
ever kept.

The C kernel can instead quantize the activations to int8, one scale per 32-block, and
sum integer products (csrc/qmm8.c, em_mxfp4_mm8: vpdpbusd / vpmaddubsw / sdot): opt in
with EDGEMOE_MXFP4_ACT=int8 or `set_activations("int8")`. The default stays "fp32": the
float products keep gpt-oss's outputs those of transformers on the dequantized weights
(tests/models/families/test_gpt_oss.py); edgemoe_lab/results/quant_kernels.md measures both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..cpu import linear
from . import kernels, native
from .experts import QuantExpert, check_parts
from .formats import Format, TensorSpec

BLOCK = 32  # elements sharing one exponent
BLOCK_BYTES = BLOCK // 2
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
EMAX_ELEM = 2  # exponent of E2M1's largest normal value (6 = 1.5 * 2^2)
DEQUANT_ROWS = 512  # weight rows dequantized per chunk by the kernel

# Explicit device: formats may be used while a model is built under torch.device("meta").
_LUT = torch.tensor(FP4_VALUES, dtype=torch.float32, device="cpu")
# 2^(e - 127) for every E8M0 code; 255 is the spec's NaN.
_POW2 = torch.cat([torch.exp2(torch.arange(255, dtype=torch.float64, device="cpu") - SCALE_BIAS),
                   torch.tensor([float("nan")], dtype=torch.float64, device="cpu")]).float()
# Round-to-nearest-even boundaries between consecutive E2M1 magnitudes; at a tie the even
# code wins, so the comparison is strict (stay low) after an even code and not after an odd.
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


ACT_ENV = "EDGEMOE_MXFP4_ACT"
ACT_PATHS = ("fp32", "int8")


def _env_activations() -> str:
    v = os.environ.get(ACT_ENV, "").strip().lower()
    if v in ("", "auto", "default"):
        return "fp32"
    if v not in ACT_PATHS:
        raise ValueError(f"{ACT_ENV}={v!r}: expected one of {', '.join(ACT_PATHS)}")
    return v


ACTIVATIONS = _env_activations()  # activations of the MXFP4 C kernel: "fp32" or "int8"


def set_activations(path: str | None) -> str:
    """Select the MXFP4 kernel's activations ("fp32" or "int8"; None: the default or
    EDGEMOE_MXFP4_ACT). Returns the previous one."""
    global ACTIVATIONS
    prev = ACTIVATIONS
    path = _env_activations() if path is None else path
    if path not in ACT_PATHS:
        raise ValueError(f"MXFP4 activation path {path!r}: expected one of {', '.join(ACT_PATHS)}")
    ACTIVATIONS = path
    return prev


def groups(k: int) -> int:
    """Blocks per row of k inputs."""
    return -(-k // BLOCK)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, k: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weights (n, k) from codes (n, G * 16) or (n, G, 16) and exponents (n, G),
    uint8. Exact in float32 and bfloat16 (every value is an FP4 value times a power of
    two)."""
    n, g = scales.shape
    codes = blocks.reshape(n, g, BLOCK_BYTES)
    lo = _LUT[(codes & 0x0F).long()]  # (n, G, 16) even elements
    hi = _LUT[(codes >> 4).long()]  # (n, G, 16) odd elements
    vals = torch.stack([lo, hi], dim=-1).view(n, g, BLOCK)  # (n, G, 32)
    w = (vals * _POW2[scales.long()].unsqueeze(-1)).view(n, g * BLOCK)  # (n, G*32)
    return (w if k is None else w[:, :k]).to(dtype)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX quantization of float weights (n, k): codes (n, G * 16) and exponents (n, G)."""
    wf = w.detach().float()
    n, k = wf.shape
    g = groups(k)
    if g * BLOCK != k:
        wf = torch.nn.functional.pad(wf, (0, g * BLOCK - k))
    wf = wf.view(n, g, BLOCK)  # (n, G, 32)
    amax = wf.abs().amax(dim=-1)  # (n, G)
    # floor(log2(amax)) exactly: frexp gives amax = m * 2^e with m in [0.5, 1).
    e = torch.frexp(amax).exponent.to(torch.int32) - 1 - EMAX_ELEM
    e = torch.where(amax > 0, e, torch.full_like(e, -SCALE_BIAS))
    scales = (e + SCALE_BIAS).clamp(0, 254)  # (n, G)
    mag = torch.ldexp(wf.abs(), -(scales - SCALE_BIAS).unsqueeze(-1).float())  # (n, G, 32) |w| / 2^X
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for i, b in enumerate(_BOUNDS):
        code += (mag > b) if i % 2 == 0 else (mag >= b)
    code += ((wf < 0) & (code > 0)).to(torch.uint8) * 8  # sign bit; zero stays +0
    code = code.view(n, g, BLOCK_BYTES, 2)
    packed = code[..., 0] | (code[..., 1] << 4)  # (n, G, 16)
    return packed.reshape(n, g * BLOCK_BYTES).contiguous(), scales.to(torch.uint8).contiguous()


@dataclass
class MXFP4Matrix:
    """An (N, K) MXFP4 weight held as (views of) its codes and exponents."""

    blocks: torch.Tensor  # (N, G*16) uint8
    scales: torch.Tensor  # (N, G) uint8
    k: int  # true input size (x has k columns)

    @property
    def n(self) -> int:
        return self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + self.scales.nbytes


def mxfp4_mm(x: torch.Tensor, w: MXFP4Matrix, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(w)^T -> (M, N) in out_dtype (default x.dtype).

    Up to packed_max_batch() rows the C kernel computes from the codes with fp32
    activations; larger batches dequantize DEQUANT_ROWS weight rows at a time (exact) for
    a float matmul, in fp32 for fp32 activations. Without the C kernel both happen in torch."""
    out_dtype = out_dtype or x.dtype
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has {k} columns, weight expects {w.k}")
    lib = native.get()
    if lib is not None and m <= kernels.packed_max_batch("int8" if ACTIVATIONS == "int8" else "int16"):
        return _mm_native(lib, x, w, out_dtype)
    dt = torch.float32 if lib is None or x.dtype == torch.float32 else kernels.MATMUL_DTYPE
    xd = x.to(dt)
    y = torch.empty(m, w.n, dtype=dt)  # (M, N)
    for n0 in range(0, w.n, DEQUANT_ROWS):
        n1 = min(w.n, n0 + DEQUANT_ROWS)
        y[:, n0:n1] = linear(xd, dequant_rows(w, n0, n1, dt))  # (M, n1-n0)
    return y.to(out_dtype)


def dequant_rows(w: MXFP4Matrix, n0: int, n1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [n0, n1) of the dequantized weight, (n1 - n0, K), with the C kernel if built."""
    lib = native.get()
    if lib is None or dtype not in (torch.float32, torch.bfloat16):
        return dequantize(w.blocks[n0:n1], w.scales[n0:n1], w.k, dtype)
    out = torch.empty(n1 - n0, w.k, dtype=dtype)
    rc = lib.em_mxfp4_dequant(w.blocks.data_ptr(), w.scales.data_ptr(), n0, n1, w.k, w.scales.shape[1],
                              out.data_ptr(), native.DTYPES[dtype], torch.get_num_threads())
    if rc:
        raise RuntimeError(f"em_mxfp4_dequant failed with code {rc}")
    return out


def _mm_native(lib, x: torch.Tensor, w: MXFP4Matrix, out_dtype: torch.dtype, act: str | None = None) -> torch.Tensor:
    """The C kernel: fp32 activations (em_mxfp4_mm) or int8 ones with one scale per 32-block
    (em_mxfp4_mm8); `act` ("fp32" or "int8") defaults to ACTIVATIONS."""
    if x.dtype not in native.DTYPES:
        x = x.float()
    x = x.contiguous()
    ydt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.empty(x.shape[0], w.n, dtype=ydt)  # (M, N)
    fn = lib.em_mxfp4_mm8 if (act or ACTIVATIONS) == "int8" else lib.em_mxfp4_mm
    rc = fn(x.data_ptr(), native.DTYPES[x.dtype], x.shape[0], w.k, w.blocks.data_ptr(),
                         w.scales.data_ptr(), w.n, w.scales.shape[1], y.data_ptr(), native.DTYPES[ydt],
                         torch.get_num_threads())
    if rc:
        raise RuntimeError(f"em_mxfp4_mm failed with code {rc}")
    return y if ydt == out_dtype else y.to(out_dtype)


class MXFP4Format(Format):
    """Experts as MXFP4 codes (see the module docstring)."""

    name = "mxfp4"

    def _mats(self, hidden: int, inter: int):
        return (("w13", 2 * inter, hidden), ("w2", hidden, inter))

    def layout(self, hidden: int, inter: int) -> list[TensorSpec]:
        out = []
        for name, n, k in self._mats(hidden, inter):
            out.append(TensorSpec(f"{name}.blocks", torch.uint8, (n, groups(k) * BLOCK_BYTES)))
            out.append(TensorSpec(f"{name}.scales", torch.uint8, (n, groups(k))))
        return out

    def encode(self, gate, up, down):
        out = {}
        for name, w in (("w13", torch.cat([gate, up], dim=0)), ("w2", down)):
            out[f"{name}.blocks"], out[f"{name}.scales"] = quantize(w)
        return out

    def encode_codes(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored tensors from codes already in MXFP4 (`gate_blocks`, `gate_scales`,
        `up_...`, `down_...`: blocks (n, G, 16) or (n, G*16), scales (n, G)), unchanged."""
        def flat(t):
            return t.reshape(t.shape[0], -1)

        return {
            "w13.blocks": torch.cat([flat(parts["gate_blocks"]), flat(parts["up_blocks"])]).contiguous(),
            "w13.scales": torch.cat([parts["gate_scales"], parts["up_scales"]]).contiguous(),
            "w2.blocks": flat(parts["down_blocks"]).contiguous(),
            "w2.scales": parts["down_scales"].contiguous(),
        }

    def matrices(self, parts: dict[str, torch.Tensor], hidden: int, inter: int) -> tuple[MXFP4Matrix, MXFP4Matrix]:
        check_parts(self, parts, hidden, inter)
        return tuple(MXFP4Matrix(parts[f"{name}.blocks"], parts[f"{name}.scales"], k)
                     for name, _, k in self._mats(hidden, inter))

    def expert(self, parts, act, dtype):
        # Row counts give the true sizes (K is padded to whole blocks in the codes).
        hidden, inter = parts["w2.blocks"].shape[0], parts["w13.blocks"].shape[0] // 2
        w13, w2 = self.matrices(parts, hidden, inter)
        return QuantExpert(w13, w2, act, mxfp4_mm, parts.get("b13"), parts.get("b2"))


def dequantize_parts(parts: dict[str, torch.Tensor], hidden: int, inter: int) -> tuple[torch.Tensor, ...]:
    """gate (I, H), up (I, H), down (H, I) in fp32 from checkpoint MXFP4 parts (see
    `MXFP4Format.encode_codes`)."""
    gate = dequantize(parts["gate_blocks"], parts["gate_scales"], hidden)
    up = dequantize(parts["up_blocks"], parts["up_scales"], hidden)
    down = dequantize(parts["down_blocks"], parts["down_scales"], inter)
    return gate, up, down


FORMAT = MXFP4Format()
