"""int8 storage for the resident (non-expert) weights of a converted model.

`edgemoe convert --resident int8` stores every resident linear layer (attention
projections, shared experts, dense MLPs, an untied LM head) as an `Int8Linear`: an int8
weight `<name>.qweight` (N, K) plus per-output-channel scales `<name>.scale` (N,) in the
compute dtype, in place of `<name>.weight`. The manifest lists these layers, and the
runtime swaps the same modules for `Int8Linear` before loading the resident tensors.

Kept in float: embeddings (a lookup, and the LM head of tied models), norms, routers
(their logits choose the experts; they are small) and Qwen2-MoE's one-row shared-expert
gate.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import StoreError
from .kernels import quantize_int8
from .linear import FLOAT_LINEARS, Int8Linear

RESIDENT_FORMATS = ("float", "int8")
_KEEP_FLOAT = ("shared_gate",)  # module attribute names left in float


def int8_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers `--resident int8` quantizes, in module order."""
    out = []
    for name, mod in model.named_modules():
        if type(mod) in FLOAT_LINEARS and name.rsplit(".", 1)[-1] not in _KEEP_FLOAT:
            out.append(name)
    return out


def quantize_resident(model: nn.Module, tensors: dict[str, torch.Tensor], scale_dtype: torch.dtype) -> list[str]:
    """Replace, in `tensors` (resident state dict by canonical name), the weight of every
    target layer of `model` (built on the meta device is fine) by its int8 codes and
    scales. Returns the quantized layer names."""
    names = int8_targets(model)
    for name in names:
        w = tensors.pop(f"{name}.weight", None)
        if w is None:  # e.g. an LM head tied to the embedding is not a separate tensor
            continue
        q = quantize_int8(w, scale_dtype)
        tensors[f"{name}.qweight"] = q.q.contiguous()
        tensors[f"{name}.scale"] = q.scale.contiguous()
        bias = tensors.get(f"{name}.bias")
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(scale_dtype)
    return [n for n in names if f"{n}.qweight" in tensors]


def swap_int8_(model: nn.Module, names: list[str], scale_dtype: torch.dtype, source: str) -> None:
    """Replace the named nn.Linear modules of `model` with (meta-device) Int8Linear
    modules of the same shape, so a resident state dict with int8 layers loads into it."""
    modules = dict(model.named_modules())
    for name in names:
        lin = modules.get(name)
        if type(lin) not in FLOAT_LINEARS:
            raise StoreError(f"{source}: int8 resident layer {name!r} is not a linear layer of this model")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        with torch.device("meta"):
            q = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, scale_dtype)
        setattr(parent, attr, q)
