"""Granite MoE with a shared expert (transformers' GraniteMoeShared: IBM Granite MoE
checkpoints whose layers add a dense shared MLP to the routed experts).

Granite MoE (see granitemoe.py) plus an always-on shared MLP of width
`shared_intermediate_size` (0: none) whose output is added, unweighted, to the routed
experts' before the residual multiplier. Its gate and up projections are stored fused as
`shared_mlp.input_linear` (2S, H), gate rows first; `output_linear` (H, S) is down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from . import granitemoe
from .base import MLP, Transformer


@dataclass
class ModelArgs(granitemoe.ModelArgs):
    shared_intermediate_size: int = 0

    ZERO_OK = granitemoe.ModelArgs.ZERO_OK | {"shared_intermediate_size"}
    LIMITS = {**granitemoe.ModelArgs.LIMITS, "shared_intermediate_size": 1 << 20}


def build(args: ModelArgs) -> Transformer:
    """The decoder stack for `args`; routed experts come from a provider attached later."""
    width = args.shared_intermediate_size
    shared = (lambda i: MLP(args.hidden_size, width, args.hidden_act)) if width else None
    return granitemoe.finish(args, granitemoe.build_layers(args, shared))


_SHARED = re.compile(r"model\.layers\.(\d+)\.shared_mlp\.(input|output)_linear\.weight$")


def sanitize(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Granite MoE's names plus the fused shared MLP, split into gate/up/down."""
    m = _SHARED.match(name)
    if not m:
        return granitemoe.sanitize(name, tensor)
    prefix = f"layers.{m.group(1)}.mlp.shared"
    if m.group(2) == "output":
        return [(f"{prefix}.down.weight", tensor)]
    if tensor.dim() != 2 or tensor.shape[0] % 2:
        raise ModelLoadError(f"{name!r} should be 2-D with an even number of rows (gate then up), "
                             f"got shape {tuple(tensor.shape)}")
    gate, up = tensor.chunk(2, dim=0)  # (S, H) x2
    return [(f"{prefix}.gate.weight", gate), (f"{prefix}.up.weight", up)]
