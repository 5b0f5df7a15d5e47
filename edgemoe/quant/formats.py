"""Expert storage formats.

A format turns an expert's float weights (gate, up: (I, H); down: (H, I)) into a list of
named, contiguous tensors in the layout its compute kernel wants, and builds a callable
`Expert` back from views of those tensors. The expert store lays the tensors out in one
aligned blob and, at load time, hands back zero-copy views into its cache slab, so
nothing is allocated or converted per load.

Formats are named by strings recorded in the store manifest ("bf16", "int4", ...); the
name -> format table and the name grammars are registry.py's. This module owns the
`Format` interface, the float formats and the bias layout; the quantized formats are
experts.py's and mxfp4.py's, which import this module (never the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..experts import DenseExpert, Expert
from .registry import FORMATS, get_format, register  # noqa: F401 - re-exported: callers import them from here


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an encoded expert: how to view it inside the blob."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()


class Format:
    """Base class. Subclasses set `name` and implement the three methods."""

    name: str = ""

    def layout(self, hidden: int, inter: int) -> list[TensorSpec]:
        """The tensors one expert of this shape is stored as, in blob order."""
        raise NotImplementedError

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize/pack float weights into tensors matching `layout`."""
        raise NotImplementedError

    def expert(self, parts: dict[str, torch.Tensor], act: str, dtype: torch.dtype) -> Expert:
        """An Expert computing with (views of) the encoded tensors; activations in `dtype`.
        `parts` may also hold float biases "b13" (2I,) and "b2" (H,) (gpt-oss experts),
        which the store keeps next to the format's own tensors (BIAS_PARTS); the expert
        adds them after the gate/up and the down matmul."""
        raise NotImplementedError

    def bias_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The float type expert biases are stored in next to this format's tensors, for
        a model computing in `compute`."""
        return compute

    def tag(self) -> str:
        """Identifies a machine-dependent layout (e.g. a CPU-specific packing); the store
        records it and refuses to use blobs written under a different tag."""
        return ""

    def bits_per_weight(self, hidden: int, inter: int) -> float:
        return 8 * sum(s.nbytes for s in self.layout(hidden, inter)) / (3 * hidden * inter)


class FloatFormat(Format):
    """Unquantized experts in bf16, fp16 or fp32: gate and up stacked as w13 (2I, H)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def layout(self, hidden: int, inter: int) -> list[TensorSpec]:
        return [TensorSpec("w13", self.dtype, (2 * inter, hidden)), TensorSpec("w2", self.dtype, (hidden, inter))]

    def encode(self, gate, up, down):
        return {"w13": torch.cat([gate, up], 0).to(self.dtype).contiguous(), "w2": down.to(self.dtype).contiguous()}

    def bias_dtype(self, compute):
        return self.dtype  # added to the matmul outputs, which are in the weights' type

    def expert(self, parts, act, dtype):
        # Views are used as stored; DenseExpert casts activations when dtypes differ.
        return DenseExpert.from_stacked(parts["w13"], parts["w2"], act, parts.get("b13"), parts.get("b2"))


# Expert biases a blob may carry after its format's tensors, in this order.
BIAS_PARTS = ("b13", "b2")


def bias_specs(hidden: int, inter: int, dtype: torch.dtype, names=BIAS_PARTS) -> list[TensorSpec]:
    """The float bias tensors an expert blob carries after its format's tensors: b13
    (2I,) for gate and up stacked, b2 (H,) for down (any subset, in BIAS_PARTS order)."""
    shapes = {"b13": (2 * inter,), "b2": (hidden,)}
    return [TensorSpec(n, dtype, shapes[n]) for n in BIAS_PARTS if n in names]


# The unquantized formats, registered by the package's __init__.
FLOAT_FORMATS = (
    FloatFormat("bf16", torch.bfloat16),
    FloatFormat("fp16", torch.float16),
    FloatFormat("fp32", torch.float32),
)
