"""Per-expert storage formats applied to a model held in RAM.

`ExpertVariants` keeps a model's original (float) experts and builds any of them in any
storage format on demand, with the same `Format.encode` and `Format.expert` that
`edgemoe convert` and the offloaded runtime use: a quantized expert computes exactly as it
would from the expert store, so a plan measured here is the plan the store runs.

Originals are encoded from the in-RAM weights. Loaded in float32 (what profiling and
planning do) these hold every bf16, fp16 or fp32 checkpoint weight exactly, so the codes
equal the converter's, which encodes the checkpoint tensors as stored. Float formats
whose dtype differs from the compute dtype (bf16 experts of a float32 run) are the
weights rounded to that dtype and computed in the compute dtype, which for a bf16
checkpoint is the original expert itself.

`stored_bytes` is the size of one expert in the store: its format's blob payload
(`FormatInfo.of`, the converter's layout) padded to the store's 4 KiB alignment, the
bytes a cache slot takes and a miss reads.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from ..errors import EdgeMoEError
from ..experts import DenseExpert, Expert
from ..models.moe import InRAMProvider
from ..quant.formats import FloatFormat, get_format
from ..store.format import ExpertPlan, FormatInfo, round_up

Key = tuple[int, int]  # (layer, expert)


@lru_cache(maxsize=None)
def stored_bytes(fmt: str, hidden: int, inter: int) -> int:
    """Bytes one expert of this shape takes in the expert store in format `fmt`
    (payload padded to the blob alignment, as `ExpertEntry.length`)."""
    return round_up(FormatInfo.of(get_format(fmt), hidden, inter).size)


def plan_bytes(formats: Mapping[Key, str], hidden: int, inter: int) -> int:
    """Stored bytes of all experts under a per-expert format assignment."""
    return sum(stored_bytes(f, hidden, inter) for f in formats.values())


def canonical(name: str) -> str:
    """The registered spelling of a format name ("int4-g64" -> "int4")."""
    return get_format(name).name


def assignment(plan: ExpertPlan, moe_layers, experts_per_layer: int) -> dict[Key, str]:
    """Every expert's canonical format under `plan`."""
    return {(l, e): canonical(plan.format_for(l, e)) for l in moe_layers for e in range(experts_per_layer)}


def to_plan(formats: Mapping[Key, str], default: str, meta: dict | None = None) -> dict:
    """A plan (version 1 JSON object) giving each expert its format: the most common
    format becomes the default, the others are listed per expert."""
    plan = ExpertPlan(default, experts={k: f for k, f in sorted(formats.items()) if f != default})
    d = plan.to_dict()
    if meta:
        d["meta"] = meta
    return d


class ExpertVariants:
    """A model's original experts and their encodings in other formats (cached)."""

    def __init__(self, model, cache: bool = True):
        blocks = list(model.moe_blocks())
        if not blocks:
            raise EdgeMoEError("the model has no MoE layers")
        provider = blocks[0].provider
        if not isinstance(provider, InRAMProvider):
            raise EdgeMoEError("bitwidth adaptation needs a model with its experts in RAM (a Hugging Face directory)")
        self.model = model
        self.args = model.args
        self.originals: dict[Key, DenseExpert] = dict(provider.table)
        first = next(iter(self.originals.values()))
        self.dtype = first.w13.dtype
        self.act = self.args.expert_act
        self.hidden, self.inter = self.args.hidden_size, self.args.expert_dim
        self.keys = sorted(self.originals)
        self._cache: dict[tuple[Key, str], Expert] | None = {} if cache else None

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original gate (I, H), up (I, H) and down (H, I)."""
        d = self.originals[key]
        g, u = d.w13.chunk(2, dim=0)
        return g, u, d.w2

    def expert(self, key: Key, fmt: str) -> Expert:
        """Expert `key` stored in format `fmt`."""
        if self._cache is not None and (key, fmt) in self._cache:
            return self._cache[(key, fmt)]
        f = get_format(fmt)
        gate, up, down = self.weights(key)
        if isinstance(f, FloatFormat) and f.dtype != self.dtype:
            if f.dtype == torch.float32 or all(_exact(w, f.dtype) for w in (gate, up, down)):
                ex = self.originals[key]  # the format holds these weights exactly
            else:
                ex = DenseExpert(*(w.to(f.dtype).to(self.dtype) for w in (gate, up, down)), act=self.act)
        else:
            ex = f.expert(f.encode(gate, up, down), self.act, self.dtype)
        if self._cache is not None:
            self._cache[(key, fmt)] = ex
        return ex

    def table(self, formats: Mapping[Key, str]) -> dict[Key, Expert]:
        return {k: self.expert(k, formats[k]) if k in formats else self.originals[k] for k in self.keys}

    def attach(self, formats: Mapping[Key, str]) -> InRAMProvider:
        """Serve the model's MoE blocks from experts in the given formats (unlisted
        experts stay original); returns the provider."""
        provider = InRAMProvider(self.table(formats))
        for block in self.model.moe_blocks():
            block.provider = provider
        return provider

    def restore(self) -> None:
        """Serve the original experts again."""
        self.attach({})

    def bytes(self, formats: Mapping[Key, str]) -> int:
        return plan_bytes(formats, self.hidden, self.inter)


def _exact(w: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(w.to(dtype).to(w.dtype), w))


def load_planned(path: str | Path, plan: ExpertPlan | str | Path, dtype: str | torch.dtype | None = None):
    """A Hugging Face model loaded into RAM with every expert in its planned format:
    the in-RAM twin of `edgemoe convert --plan` + `load_converted`. Returns (model,
    checkpoint, formats)."""
    from ..checkpoint import load_hf

    model, ckpt = load_hf(path, dtype)
    if not isinstance(plan, ExpertPlan):
        plan = ExpertPlan.read(plan)
    args = model.args
    plan.check(args.moe_layers(), args.experts_per_layer, "plan")
    formats = assignment(plan, args.moe_layers(), args.experts_per_layer)
    variants = ExpertVariants(model, cache=False)
    variants.attach(formats)
    return model, ckpt, formats
