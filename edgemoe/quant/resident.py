"""int8 / int4 storage for the resident (non-expert) weights of a converted model.

`edgemoe convert --resident int8` stores every resident linear layer (attention
projections, shared experts, dense MLPs, an untied LM head) as an `Int8Linear`: an int8
weight `<name>.qweight` (N, K) plus per-output-channel scales `<name>.scale` (N,) in the
compute dtype, in place of `<name>.weight`. The manifest lists these layers, and the
runtime swaps the same modules for `Int8Linear` before loading the resident tensors.

`--resident int4` stores the same layers as `Int4Linear` (the experts' int4 layout):
packed codes `<name>.qweight` (N, Kp/2) uint8 and group scales `<name>.qscale` (N, Kp/64)
fp16, K padded to whole groups. The scales stay fp16 whatever the compute dtype (the
kernels read fp16 group scales; a bf16 round trip would change them): `kept_as_stored`
names them for the reader and the budget.

Kept in float: embeddings (a lookup, and the LM head of tied models), norms, routers
(their logits choose the experts; they are small) and Qwen2-MoE's one-row shared-expert
gate.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import StoreError
from .kernels import quantize_int8
from .linear import FLOAT_LINEARS, Int4Linear, Int8Linear, quantize_int4

RESIDENT_FORMATS = ("float", "int8", "int4")
_KEEP_FLOAT = ("shared_gate",)  # module attribute names left in float


def int8_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers `--resident int8` quantizes, in module order."""
    out = []
    for name, mod in model.named_modules():
        if type(mod) in FLOAT_LINEARS and name.rsplit(".", 1)[-1] not in _KEEP_FLOAT:
            out.append(name)
    return out


def quantize_resident(model: nn.Module, tensors: dict[str, torch.Tensor], scale_dtype: torch.dtype,
                      fmt: str = "int8") -> list[str]:
    """Replace, in `tensors` (resident state dict by canonical name), the weight of every
    target layer of `model` (built on the meta device is fine) by its `fmt` ("int8" or
    "int4") codes and scales. Returns the quantized layer names."""
    if fmt not in ("int8", "int4"):
        raise ValueError(f"resident quantization {fmt!r}: expected int8 or int4")
    names = int8_targets(model)
    for name in names:
        w = tensors.pop(f"{name}.weight", None)
        if w is None:  # e.g. an LM head tied to the embedding is not a separate tensor
            continue
        if fmt == "int4":
            tensors[f"{name}.qweight"], tensors[f"{name}.qscale"] = quantize_int4(w)
        else:
            q = quantize_int8(w, scale_dtype)
            tensors[f"{name}.qweight"] = q.q.contiguous()
            tensors[f"{name}.scale"] = q.scale.contiguous()
        bias = tensors.get(f"{name}.bias")
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(scale_dtype)
    return [n for n in names if f"{n}.qweight" in tensors]


def swap_int8_(model: nn.Module, names: list[str], scale_dtype: torch.dtype, source: str, fmt: str = "int8") -> None:
    """Replace the named nn.Linear modules of `model` with (meta-device) Int8Linear
    (fmt "int4": Int4Linear) modules of the same shape, so a resident state dict with
    such layers loads into it. A name that is not a linear layer is a StoreError naming
    `source` (the manifest)."""
    cls = {"int8": Int8Linear, "int4": Int4Linear}[fmt]
    modules = dict(model.named_modules())
    for name in names:
        lin = modules.get(name)
        if type(lin) not in FLOAT_LINEARS:
            raise StoreError(f"{source}: {fmt} resident layer {name!r} is not a linear layer of this model")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        with torch.device("meta"):
            q = cls(lin.in_features, lin.out_features, lin.bias is not None, scale_dtype)
        setattr(parent, attr, q)


def swap_int4_(model: nn.Module, names: list[str], dtype: torch.dtype, source: str) -> None:
    """swap_int8_ for the manifest's int4 layers (Int4Linear; biases in `dtype`)."""
    swap_int8_(model, names, dtype, source, "int4")


def kept_as_stored(int4_names: list[str]) -> set[str]:
    """Resident tensor names read in their stored dtype whatever the compute dtype: the
    fp16 group scales of the int4 layers `int4_names`."""
    return {f"{n}.qscale" for n in int4_names}
