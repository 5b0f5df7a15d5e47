"""int8 weights for the resident (non-expert) layers: attention projections, shared
experts, dense MLPs, the LM head.

`Int8Linear` keeps a per-output-channel symmetric int8 weight and its scales as buffers
(`qweight` (N, K) int8, `scale` (N,)), so a state dict round-trips with safetensors, and
computes with the C kernel for small batches (decode) or dequantize + matmul for large
ones (prefill); see kernels.int8_mm. The C kernel runs these layers with int16
activations (kernels.RESIDENT_ACTIVATIONS, EDGEMOE_RESIDENT_ACT): int8 activations here
are untested for accuracy (issue 15 section 4), and on a random tiny MoE they move the
logits by up to half their range through routing flips (the experts' int8 path is
measured in edgemoe_lab/results/quant_kernels.md).

`Int4Linear` keeps the experts' default int4 layout instead (group-wise symmetric, 64
weights per fp16 scale, K padded to whole groups; quantize.py): buffers `qweight` (N, Kp/2)
uint8 and `qscale` (N, Kp/G) fp16, 4.25 bits per weight. It computes with kernels.qmm,
the experts' dispatcher: the packed C kernel up to packed_max_batch() rows, dequantize +
matmul above, and the experts' activation path (kernels.ACTIVATIONS, int8 by default: the
int16 path is about 2x slower on int4 codes, and decode is memory-bound). Its accuracy on
the bundled model is in edgemoe_lab/results/resident_act.md.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..cpu import Linear
from . import kernels
from .experts import DEFAULT_GROUP
from .kernels import Int8Matrix, QMatrix, int8_mm, qmm, quantize_int8
from .quantize import QuantSpec, Quantized, dequantize, pack, quantize, unpack

# The float linear layers int8 quantization may replace.
FLOAT_LINEARS = (nn.Linear, Linear)


class QuantLinear(nn.Module):
    """What the quantized linear layers share: the forward through their matrix's kernel
    (`_mm` on rows), the bias, and the description of a one-row call for the fused decode
    call of an attention half (edgemoe.fastops.attn_half)."""

    def _mm(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def decode_desc(self) -> tuple[int, ...] | None:
        """What a one-row forward passes to the C kernel (kernels.row_desc); None: not fusable."""
        if self.bias is not None:
            return None
        return kernels.row_desc(self.matrix(), self.activations())


class Int8Linear(QuantLinear):
    """Drop-in for a bias-optional nn.Linear with an int8 weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale_dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> "Int8Linear":
        """Quantize an nn.Linear's weight (scales in the layer's dtype unless given)."""
        scale_dtype = scale_dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scale_dtype)
        w = quantize_int8(linear.weight.detach(), scale_dtype)
        m.qweight.copy_(w.q)
        m.scale.copy_(w.scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(scale_dtype))
        return m

    def dequantized(self) -> torch.Tensor:
        """The weight the layer computes with, (N, K) fp32 (for tests and debugging)."""
        return self.qweight.float() * self.scale.float().unsqueeze(1)

    def matrix(self) -> Int8Matrix:
        """The weight as a kernels.Int8Matrix view of the buffers (no copy)."""
        return Int8Matrix(self.qweight, self.scale)

    def activations(self) -> str:
        return kernels.RESIDENT_ACTIVATIONS

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8_mm(x, self.matrix(), x.dtype, act=self.activations())  # (M, N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


INT4_SPEC = QuantSpec(4, DEFAULT_GROUP)  # the experts' default int4 layout (experts.GroupwiseFormat)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (N, K) as Int4Linear's (qweight (N, Kp/2) uint8, qscale (N, Kp/G) fp16):
    the experts' int4 codes (scale search on), packed."""
    qz = quantize(w.detach(), INT4_SPEC, search=True)
    return pack(qz.q, INT4_SPEC.bits).contiguous(), qz.scale.contiguous()


class Int4Linear(QuantLinear):
    """Drop-in for a bias-optional nn.Linear with a group-wise symmetric int4 weight."""

    spec = INT4_SPEC

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bias_dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        sp = self.spec
        self.register_buffer("qweight", torch.zeros(out_features, sp.row_bytes(in_features), dtype=torch.uint8))
        self.register_buffer("qscale", torch.ones(out_features, sp.groups(in_features), dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        """Quantize an nn.Linear's weight (the bias stays in the layer's dtype)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        q, s = quantize_int4(linear.weight)
        m.qweight.copy_(q)
        m.qscale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def matrix(self) -> QMatrix:
        """The weight as a kernels.QMatrix view of the buffers (no copy)."""
        return QMatrix(self.qweight, self.qscale, None, self.spec, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes the layer holds: codes, scales and bias."""
        return self.qweight.nbytes + self.qscale.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer computes with, (N, K) fp32 (for tests and debugging)."""
        codes = unpack(self.qweight, self.spec.bits)  # (N, Kp)
        return dequantize(Quantized(codes, self.qscale, None, self.spec, self.in_features))

    def activations(self) -> str | None:
        return None  # the experts' path (kernels.ACTIVATIONS)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return qmm(x, self.matrix(), x.dtype)  # (M, N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.spec.group}"


def quantize_linears_(
    module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None
) -> list[str]:
    """Replace, in place, every nn.Linear under `module` for which include(name, layer) is
    true (all of them by default) with an Int8Linear. Returns the replaced names."""
    done = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if type(sub) in FLOAT_LINEARS and (include is None or include(full, sub)):
                setattr(child, attr, Int8Linear.from_linear(sub))
                done.append(full)
    return done
