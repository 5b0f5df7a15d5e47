"""Quantized expert formats and the experts they build.

Names (recorded in the store manifest; the registry parses them with `parse_format`):

    int8                    per-output-channel symmetric int8, bf16 scales    8 bits + 16/K
    int4, int3, int2        group-wise symmetric, 64 weights per fp16 scale    b + 0.25
    int4-asym, int3-asym,   group-wise asymmetric (fp16 scale and zero per     b + 0.5
    int2-asym               group of 64)
    ...-g128, -g256, ...    the same with another group size (a multiple of 64)

Bits per weight are exact for shapes whose input sizes are multiples of the group size;
otherwise rows are padded to whole groups. Every layout here is portable (the same bytes
on every CPU), so `tag()` is empty: the kernels read it as stored, nothing is repacked.

Owns these formats and their name grammar; it registers nothing itself (the package's
__init__ does), and the kernels and codes it uses are kernels.py's and quantize.py's.
"""

from __future__ import annotations

import re

import torch

from ..errors import StoreError
from ..experts import ACTIVATIONS, glu
from .formats import Format, TensorSpec, UngatedFormat
from . import kernels
from .kernels import Int8Matrix, QMatrix, int8_mm, qmm, quantize_int8
from .quantize import BLOCK, QuantSpec, pack, quantize

DEFAULT_GROUP = 64
MAX_GROUP = 4096


def check_parts(fmt: Format, parts: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
    """The kernels read the tensors in place, so they must be exactly what layout() says:
    a mismatch means the blob was written for another format or shape."""
    for spec in fmt.layout(hidden, inter):
        t = parts.get(spec.name)
        if t is None:
            raise StoreError(f"expert in format {fmt.name!r} is missing tensor {spec.name!r}")
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape or not t.is_contiguous():
            raise StoreError(
                f"expert tensor {spec.name!r} of format {fmt.name!r} is {t.dtype} {tuple(t.shape)}"
                f"{'' if t.is_contiguous() else ' non-contiguous'}, expected contiguous {spec.dtype} {spec.shape}"
            )


class QuantExpert:
    """An expert whose gate/up (stacked) and down matrices are quantized. Holds only views
    of the encoded tensors; every call allocates just its activations.

    With int8 activations (kernels.ACTIVATIONS), a batch the packed kernels take, no biases
    and an elementwise activation (kernels.FUSED_ACTS), the whole expert is one C call
    (kernels.expert_fused): no Python between gate/up, the activation and down."""

    def __init__(self, w13, w2, act: str, mm, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None):
        self.w13, self.w2 = w13, w2  # QMatrix, Int8Matrix or MXFP4Matrix
        self.b13, self.b2 = b13, b2  # float biases (2I,), (H,) or None
        self.glu = glu(act)
        self._mm = mm
        self.nbytes = w13.nbytes + w2.nbytes + sum(b.nbytes for b in (b13, b2) if b is not None)
        self._fused = None  # (desc13, desc2, inter, activation code) when the fused call applies
        if b13 is None and b2 is None and act in kernels.FUSED_ACTS:
            d13, d2 = kernels.matrix_desc(w13), kernels.matrix_desc(w2)
            if d13 is not None and d2 is not None:
                self._fused = (d13, d2, w2.k if isinstance(w2, QMatrix) else w2.q.shape[1], kernels.FUSED_ACTS[act])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, H)
        if self._fused is not None and kernels.fused_ok(x.shape[0], self.w13):
            d13, d2, inter, act = self._fused
            return kernels.expert_fused(x, d13, d2, inter, act, x.dtype)
        h = self._mm(x, self.w13, torch.float32)  # (N, 2I); fp32 so the product below is not rounded twice
        if self.b13 is not None:
            h = h + self.b13
        if self.b2 is None and self._fused is not None:  # act(gate) * up in one C pass (large batches)
            a = _glu_rows(h, self._fused[3], _down_input_dtype(x.shape[0], self.w2))  # (N, I)
            if a is not None:
                return self._mm(a, self.w2, x.dtype)  # (N, H)
        g, u = h.chunk(2, dim=-1)  # (N, I) x2
        if self.b2 is None:
            return self._mm(self.glu(g, u), self.w2, x.dtype)  # (N, H)
        return (self._mm(self.glu(g, u), self.w2, torch.float32) + self.b2).to(x.dtype)  # (N, H)


def _down_input_dtype(m: int, w2) -> torch.dtype:
    """The dtype the down matrix's kernel converts an m-row input to: the large-batch
    dequantize + matmul paths' MATMUL_DTYPE for int4/int8 weights, else fp32 (kept as is)."""
    if isinstance(w2, (QMatrix, Int8Matrix)) and m > kernels.packed_max_batch():
        return kernels.MATMUL_DTYPE
    return torch.float32


def _glu_rows(h: torch.Tensor, act: int, dtype: torch.dtype) -> torch.Tensor | None:
    """act(gate) * up of h (N, 2I) fp32, gate then up, as (N, I) in `dtype` (fp32 or bf16),
    in one C pass (csrc/decode.c em_glu; `act` a kernels.FUSED_ACTS code); None without the
    C library or for another dtype. Rounded once, where the torch ops would round when the
    down matrix's kernel converts its input."""
    lib = kernels.native.get()
    if lib is None or dtype not in (torch.float32, torch.bfloat16) or not h.is_contiguous() or h.requires_grad:
        return None
    n, two_i = h.shape
    out = torch.empty(n, two_i // 2, dtype=dtype)
    rc = lib.em_glu(h.data_ptr(), n, two_i // 2, act, out.data_ptr(), int(dtype == torch.bfloat16),
                    torch.get_num_threads())
    return out if rc == 0 else None


class UngatedQuantExpert(QuantExpert):
    """An ungated expert, down(act(w1 x)), with quantized w1 (I rows, held as "w13") and
    w2: the same matmul calls as QuantExpert on a one-matrix layout (UngatedFormat)."""

    def __init__(self, w1, w2, act: str, mm, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None):
        super().__init__(w1, w2, "relu", mm, b1, b2)  # "relu": any known name; the activation is set below
        self.act = ACTIVATIONS[act]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, H)
        h = self._mm(x, self.w13, torch.float32)  # (N, I)
        if self.b13 is not None:
            h = h + self.b13
        if self.b2 is None:
            return self._mm(self.act(h), self.w2, x.dtype)  # (N, H)
        return (self._mm(self.act(h), self.w2, torch.float32) + self.b2).to(x.dtype)  # (N, H)


class GroupwiseFormat(Format):
    """2/3/4-bit group-wise codes packed with no wasted bits (layout in quantize.py),
    computed by the packed kernels in kernels.py."""

    def __init__(self, bits: int, group: int = DEFAULT_GROUP, asym: bool = False, search: bool = True):
        if bits not in (2, 3, 4):
            raise ValueError(f"group-wise expert formats are 2, 3 or 4 bits, not {bits} (int8 is Int8Format)")
        self.spec = QuantSpec(bits, group, asym)
        self.search = search
        self.name = format_name(bits, group, asym)

    def _mats(self, hidden: int, inter: int):
        return (("w13", 2 * inter, hidden), ("w2", hidden, inter))

    def layout(self, hidden: int, inter: int) -> list[TensorSpec]:
        sp, out = self.spec, []
        for name, n, k in self._mats(hidden, inter):
            out.append(TensorSpec(f"{name}.q", torch.uint8, (n, sp.row_bytes(k))))
            out.append(TensorSpec(f"{name}.s", torch.float16, (n, sp.groups(k))))
            if sp.asym:
                out.append(TensorSpec(f"{name}.z", torch.float16, (n, sp.groups(k))))
        return out

    def encode(self, gate, up, down):
        out = {}
        for name, w in (("w13", torch.cat([gate, up], dim=0)), ("w2", down)):
            qz = quantize(w, self.spec, search=self.search)
            out[f"{name}.q"] = pack(qz.q, self.spec.bits)
            out[f"{name}.s"] = qz.scale
            if self.spec.asym:
                out[f"{name}.z"] = qz.zero
        return out

    def matrices(self, parts: dict[str, torch.Tensor]) -> tuple[QMatrix, QMatrix]:
        """The stored tensors as (w13, w2) QMatrix views; shapes come from the tensors."""
        hidden, inter = parts["w2.q"].shape[0], parts["w13.q"].shape[0] // 2
        check_parts(self, parts, hidden, inter)
        mats = []
        for name, n, k in self._mats(hidden, inter):
            mats.append(QMatrix(parts[f"{name}.q"], parts[f"{name}.s"], parts.get(f"{name}.z"), self.spec, k))
        return mats[0], mats[1]

    def expert(self, parts, act, dtype):
        w13, w2 = self.matrices(parts)
        return QuantExpert(w13, w2, act, qmm, parts.get("b13"), parts.get("b2"))

    def ungated_expert(self, parts, act, dtype):
        """An ungated expert from "w13" holding w1's I rows (UngatedFormat's layout)."""
        hidden, inter = parts["w2.q"].shape[0], parts["w13.q"].shape[0]
        check_parts(UngatedFormat(self), parts, hidden, inter)
        sp = self.spec
        w1 = QMatrix(parts["w13.q"], parts["w13.s"], parts.get("w13.z"), sp, hidden)
        w2 = QMatrix(parts["w2.q"], parts["w2.s"], parts.get("w2.z"), sp, inter)
        return UngatedQuantExpert(w1, w2, act, qmm, parts.get("b13"), parts.get("b2"))


class Int8Format(Format):
    """Per-output-channel symmetric int8 with bf16 scales: the layout torch's
    `_weight_int8pack_mm` reads directly."""

    name = "int8"

    def layout(self, hidden: int, inter: int) -> list[TensorSpec]:
        return [
            TensorSpec("w13.q", torch.int8, (2 * inter, hidden)),
            TensorSpec("w13.s", torch.bfloat16, (2 * inter,)),
            TensorSpec("w2.q", torch.int8, (hidden, inter)),
            TensorSpec("w2.s", torch.bfloat16, (hidden,)),
        ]

    def encode(self, gate, up, down):
        w13, w2 = quantize_int8(torch.cat([gate, up], dim=0)), quantize_int8(down)
        return {"w13.q": w13.q, "w13.s": w13.scale, "w2.q": w2.q, "w2.s": w2.scale}

    def expert(self, parts, act, dtype):
        check_parts(self, parts, parts["w2.q"].shape[0], parts["w13.q"].shape[0] // 2)
        w13 = Int8Matrix(parts["w13.q"], parts["w13.s"])
        w2 = Int8Matrix(parts["w2.q"], parts["w2.s"])
        return QuantExpert(w13, w2, act, int8_mm, parts.get("b13"), parts.get("b2"))

    def ungated_expert(self, parts, act, dtype):
        """An ungated expert from "w13" holding w1's I rows (UngatedFormat's layout)."""
        check_parts(UngatedFormat(self), parts, parts["w2.q"].shape[0], parts["w13.q"].shape[0])
        w1 = Int8Matrix(parts["w13.q"], parts["w13.s"])
        w2 = Int8Matrix(parts["w2.q"], parts["w2.s"])
        return UngatedQuantExpert(w1, w2, act, int8_mm, parts.get("b13"), parts.get("b2"))


# ----------------------------------------------------------------------------- names

_NAME = re.compile(r"^int([234])(-asym)?(?:-g(\d+))?$")


def format_name(bits: int, group: int, asym: bool) -> str:
    """Canonical name: the default group size is left out."""
    return f"int{bits}" + ("-asym" if asym else "") + (f"-g{group}" if group != DEFAULT_GROUP else "")


def parse_format(name: str) -> Format | None:
    """A format for a name of the grammar above, or None if the name does not match it.
    Raises ValueError for a matching name with an unusable group size."""
    m = _NAME.match(name)
    if not m:
        return None
    bits, asym = int(m.group(1)), m.group(2) is not None
    group = int(m.group(3)) if m.group(3) else DEFAULT_GROUP
    if group % BLOCK or not BLOCK <= group <= MAX_GROUP:
        raise ValueError(f"group size in {name!r} must be a multiple of {BLOCK} between {BLOCK} and {MAX_GROUP}")
    return GroupwiseFormat(bits, group, asym)


def default_formats() -> list[Format]:
    """The formats registered at import."""
    return [Int8Format()] + [GroupwiseFormat(b, DEFAULT_GROUP, a) for b in (4, 3, 2) for a in (False, True)]
