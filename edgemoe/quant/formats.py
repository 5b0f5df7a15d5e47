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

from ..experts import DenseExpert, Expert, UngatedDenseExpert
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

    def bias_layout(self, hidden: int, inter: int, dtype: torch.dtype, names=None) -> list["TensorSpec"]:
        """The bias tensors a blob of this format carries after its own (see bias_specs);
        ungated experts (UngatedFormat) carry a b13 of I values instead of 2I."""
        return bias_specs(hidden, inter, dtype, BIAS_PARTS if names is None else names)


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

    def ungated_expert(self, parts, act, dtype):
        """An ungated expert from this format's tensors holding one input matrix (UngatedFormat)."""
        return UngatedDenseExpert(parts["w13"], parts["w2"], act, parts.get("b13"), parts.get("b2"))


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


class UngatedFormat(Format):
    """Ungated experts, down(act(w1 x)) (Switch Transformers, NLLB-MoE), stored in a base
    format: the base's layout with its "w13" tensors holding w1's I rows instead of gate
    and up's 2I. Every base format here encodes and computes w13 row by row, so the same
    encoder makes the codes and the base's `ungated_expert` runs them with the same
    matmuls on the one-matrix layout. The name and machine tag are the base's: whether a
    store's experts are gated comes from its model's config (`expert_gated`)."""

    def __init__(self, base: Format):
        if not hasattr(base, "ungated_expert"):
            from ..errors import EdgeMoEError

            raise EdgeMoEError(f"expert format {base.name!r} cannot store ungated experts (one input matrix, as in "
                               "Switch Transformers and NLLB-MoE); choose a float, int8 or int2/3/4 format")
        self.base, self.name = base, base.name

    def layout(self, hidden: int, inter: int) -> list[TensorSpec]:
        out = []
        for s in self.base.layout(hidden, inter):
            if s.name.split(".")[0] == "w13":  # (2I, ...) rows of gate then up -> (I, ...) rows of w1
                s = TensorSpec(s.name, s.dtype, (inter, *s.shape[1:]))
            out.append(s)
        return out

    def encode(self, gate, up, down):
        """`gate` is the input matrix w1 (I, H); ungated experts have no `up` (None)."""
        if up is not None:
            raise ValueError("an ungated expert has no up matrix")
        return self.base.encode(gate, gate[:0], down)  # w13 = [w1; nothing]

    def expert(self, parts, act, dtype):
        return self.base.ungated_expert(parts, act, dtype)

    def bias_dtype(self, compute):
        return self.base.bias_dtype(compute)

    def bias_layout(self, hidden, inter, dtype, names=None):
        return [TensorSpec(s.name, s.dtype, (inter,)) if s.name == "b13" else s
                for s in super().bias_layout(hidden, inter, dtype, names)]

    def tag(self) -> str:
        return self.base.tag()

    def bits_per_weight(self, hidden: int, inter: int) -> float:
        return 8 * sum(s.nbytes for s in self.layout(hidden, inter)) / (2 * hidden * inter)


def for_experts(fmt: Format, gated: bool = True) -> Format:
    """The format as experts of a model use it: `fmt` itself for gated experts, its
    UngatedFormat for ungated ones (a model's `expert_gated`)."""
    return fmt if gated else UngatedFormat(fmt)
