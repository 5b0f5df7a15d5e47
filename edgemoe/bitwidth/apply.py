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

Experts with biases (gpt-oss) keep them, unquantized, in every format, as the store
does. Originals held as MXFP4 codes (a gpt-oss release) are encoded into other formats
from their exact dequantized weights, and are themselves the "mxfp4" variant. Ungated
experts (Switch Transformers, NLLB-MoE: one input matrix w1 and down) take each format's
one-matrix layout (quant.formats.UngatedFormat), as the converter stores them: 2*H*I
weights per expert where gated ones have 3*H*I.

`stored_bytes` is the size of one expert in the store: its format's blob payload
(`FormatInfo.of`, the converter's layout, bias tensors included) padded to the store's
4 KiB alignment, the bytes a cache slot takes and a miss reads.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from ..errors import EdgeMoEError
from ..experts import DenseExpert, Expert, UngatedDenseExpert
from ..models.moe import InRAMProvider
from ..quant.formats import BIAS_PARTS, FloatFormat, for_experts, get_format
from ..store.manifest import ExpertBiases, ExpertPlan, FormatInfo, round_up

Key = tuple[int, int]  # (layer, expert)


@lru_cache(maxsize=None)
def stored_bytes(fmt: str, hidden: int, inter: int, biases: ExpertBiases | None = None, gated: bool = True) -> int:
    """Bytes one expert of this shape takes in the expert store in format `fmt`, with the
    bias tensors `biases` describes (payload padded to the blob alignment, as
    `ExpertEntry.length`); `gated` False: an ungated expert's one-matrix layout."""
    return round_up(FormatInfo.of(for_experts(get_format(fmt), gated), hidden, inter, biases).size)


def plan_bytes(formats: Mapping[Key, str], hidden: int, inter: int, biases: ExpertBiases | None = None,
               gated: bool = True) -> int:
    """Stored bytes of all experts under a per-expert format assignment."""
    return sum(stored_bytes(f, hidden, inter, biases, gated) for f in formats.values())


def _mxfp4_weights(expert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """gate, up, down in fp32 of an expert held as MXFP4 codes (exact), else None."""
    from ..quant.mxfp4 import MXFP4Matrix, dequantize

    w13, w2 = getattr(expert, "w13", None), getattr(expert, "w2", None)
    if not (isinstance(w13, MXFP4Matrix) and isinstance(w2, MXFP4Matrix)):
        return None
    gate, up = dequantize(w13.blocks, w13.scales, w13.k).chunk(2, dim=0)
    return gate, up, dequantize(w2.blocks, w2.scales, w2.k)


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
        self.gated = getattr(self.args, "expert_gated", True)
        self.originals: dict[Key, Expert] = dict(provider.table)
        first = next(iter(self.originals.values()))
        # MXFP4 originals compute in the model's dtype; float ones in their weights' type.
        self.mxfp4 = _mxfp4_weights(first) is not None
        self.dtype = model.embed.weight.dtype if self.mxfp4 else (first.w13 if self.gated else first.w1).dtype
        self.act = self.args.expert_act
        self.hidden, self.inter = self.args.hidden_size, self.args.expert_dim
        # Bias tensors every expert carries (gpt-oss, NLLB-MoE), kept as they are in any format.
        self.bias_parts = tuple(n for n in BIAS_PARTS if self._bias(first, n) is not None)
        self.keys = sorted(self.originals)
        self._cache: dict[tuple[Key, str], Expert] | None = {} if cache else None

    def store_biases(self, dtype: torch.dtype) -> ExpertBiases | None:
        """How the expert store lays out these experts' biases for compute dtype `dtype`
        (None: the experts have none), for `stored_bytes`."""
        return ExpertBiases(dtype, self.bias_parts) if self.bias_parts else None

    @staticmethod
    def _bias(expert, name: str) -> torch.Tensor | None:
        """The stored bias `name` (b13, b2) of an original expert (an ungated one holds b13 as b1)."""
        if isinstance(expert, UngatedDenseExpert) and name == "b13":
            return expert.b1
        return getattr(expert, name, None)

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The original gate (I, H), up (I, H) and down (H, I); an ungated expert: w1
        (I, H), None and down."""
        d = self.originals[key]
        if not self.gated:
            return d.w1, None, d.w2
        if self.mxfp4:
            return _mxfp4_weights(d)
        g, u = d.w13.chunk(2, dim=0)
        return g, u, d.w2

    def biases(self, key: Key) -> dict[str, torch.Tensor]:
        """The original expert's bias tensors by stored name (b13, b2); empty without."""
        d = self.originals[key]
        return {n: self._bias(d, n) for n in self.bias_parts}

    def expert(self, key: Key, fmt: str) -> Expert:
        """Expert `key` stored in format `fmt`."""
        if self._cache is not None and (key, fmt) in self._cache:
            return self._cache[(key, fmt)]
        f = get_format(fmt)
        gate, up, down = self.weights(key)
        biases = self.biases(key)
        if not self.gated:
            ex = self._ungated(key, f, gate, down, biases)
        elif self.mxfp4 and f.name == "mxfp4":
            ex = self.originals[key]  # the released codes themselves
        elif isinstance(f, FloatFormat) and f.dtype != self.dtype:
            if not self.mxfp4 and (f.dtype == torch.float32 or all(_exact(w, f.dtype) for w in (gate, up, down))):
                ex = self.originals[key]  # the format holds these weights exactly
            else:
                ex = DenseExpert(*(w.to(f.dtype).to(self.dtype) for w in (gate, up, down)), act=self.act,
                                 b13=biases.get("b13"), b2=biases.get("b2"))
        else:
            ex = f.expert({**f.encode(gate, up, down), **biases}, self.act, self.dtype)
        if self._cache is not None:
            self._cache[(key, fmt)] = ex
        return ex

    def _ungated(self, key: Key, f, w1: torch.Tensor, down: torch.Tensor, biases: dict) -> Expert:
        """An ungated expert in format `f`: as gated ones, float formats round the weights
        (the original when exact), others encode the one-matrix layout and compute from it."""
        if isinstance(f, FloatFormat) and f.dtype != self.dtype:
            if f.dtype == torch.float32 or all(_exact(w, f.dtype) for w in (w1, down)):
                return self.originals[key]
            return UngatedDenseExpert(w1.to(f.dtype).to(self.dtype), down.to(f.dtype).to(self.dtype), self.act,
                                      biases.get("b13"), biases.get("b2"))
        u = for_experts(f, False)  # refuses a format without a one-matrix layout (mxfp4) by name
        return u.expert({**u.encode(w1, None, down), **biases}, self.act, self.dtype)

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

    def shared(self) -> dict[Key, Key]:
        """Experts whose weights (and biases) equal an earlier expert's -> that expert (the
        first of the group, in key order): the experts `edgemoe convert` stores as one blob
        when they get the same format (a merged group; the padding of a per-layer prune)."""
        import hashlib

        first: dict[bytes, list[Key]] = {}
        out: dict[Key, Key] = {}
        for k in self.keys:
            tensors = [t for t in (*self.weights(k), *self.biases(k).values()) if t is not None]  # ungated: no up
            h = hashlib.blake2b(digest_size=16)
            for t in tensors:
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            owners = first.setdefault(h.digest(), [])
            owner = next((o for o in owners if all(torch.equal(a, b) for a, b in zip(
                [t for t in (*self.weights(o), *self.biases(o).values()) if t is not None], tensors))), None)
            if owner is None:
                owners.append(k)
            else:
                out[k] = owner
        return out

    def bytes(self, formats: Mapping[Key, str], dtype: torch.dtype | None = None) -> int:
        """Stored bytes of the experts in these formats, biases in `dtype` (default the
        compute dtype)."""
        return plan_bytes(formats, self.hidden, self.inter, self.store_biases(dtype or self.dtype), self.gated)


def _exact(w: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(w.to(dtype).to(w.dtype), w))


def load_planned(path: str | Path, plan: ExpertPlan | str | Path, dtype: str | torch.dtype | None = None):
    """A Hugging Face model loaded into RAM with every expert in its planned format:
    the in-RAM twin of `edgemoe convert --plan` + `load_converted`. Returns (model,
    checkpoint, formats); `planned_bytes` gives what the store would hold."""
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


def planned_bytes(model, ckpt, formats: Mapping[Key, str]) -> int:
    """Stored expert bytes of `edgemoe convert --plan` for a model from `load_planned`:
    the formats' blobs with the experts' biases in the checkpoint's compute dtype (what
    convert stores them in without --dtype)."""
    from ..checkpoint import bias_names, config_dtype

    parts = bias_names(ckpt.expert_parts)  # the bias tensors convert stores with every blob
    biases = ExpertBiases(config_dtype(ckpt.config), parts) if parts else None
    return plan_bytes(formats, model.args.hidden_size, model.args.expert_dim, biases,
                      getattr(model.args, "expert_gated", True))
