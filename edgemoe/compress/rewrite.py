"""Write a Hugging Face checkpoint with its routed experts changed, in the source's own
tensor names and layouts, so that transformers and every edgemoe command load it.

Families store experts in many layouts (one tensor per expert, fused (E, 2I, H) or
(E, H, 2I), gate/up interleaved, ...), and edgemoe only knows each as a one-way
`sanitize` to canonical per-expert gate/up/down matrices. The inverse is found by
probing: a tensor of the source's shape holding each element's own flat index (float64,
exact) goes through `sanitize`, and every canonical element then names its source
position. Writing a changed expert back is a scatter to those positions. This works for
every layout `sanitize` expresses as a rearrangement; a layout it decodes (quantized
checkpoints) cannot be probed and is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import HFCheckpoint, iter_tensors
from ..errors import EdgeMoEError
from ..models.base import EXPERT_KEY

# Config keys that count the routed experts of each layer, over the families.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_ROUTER = re.compile(r"^layers\.(\d+)\.mlp\.router\.")
AUX = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
       "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def _probe(sanitize, name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """canonical name -> the flat source index of each of its elements."""
    n = 1
    for s in shape:
        n *= s
    if n >= 1 << 53:
        raise EdgeMoEError(f"tensor {name!r} is too large to probe")
    probe = torch.arange(n, dtype=torch.float64).view(shape)
    return {k: t.to(torch.int64) for k, t in sanitize(name, probe)}


def _expert_axis_ok(name: str, mapped: dict[str, torch.Tensor], num_experts: int, numel: int) -> None:
    """A fused tensor must keep each expert in its own slab along dim 0 (every layout
    transformers writes does): pruning selects along that axis."""
    per = numel // num_experts
    for key, idx in mapped.items():
        e = int(EXPERT_KEY.match(key).group(2))
        if idx.numel() and not ((idx // per) == e).all():
            raise EdgeMoEError(f"tensor {name!r}: experts are not stored along its first axis; cannot prune it")


def rewrite(src: str | Path, out: str | Path, keep: dict[int, list[int]] | None = None,
            replace: dict[tuple[int, int], dict[str, torch.Tensor]] | None = None,
            config_updates: dict | None = None) -> Path:
    """Copy the checkpoint at `src` to `out`, keeping for each MoE layer only the experts
    listed in `keep` (renumbered 0.. in that order, router rows with them) and replacing
    the canonical gate/up/down of the (layer, expert) ids in `replace` (original ids).

    Layers may keep different numbers of experts: the model then has as many slots as
    the largest count, and a layer with fewer fills its last slots with padding (see
    `padded_slots`), recorded in config.json as `edgemoe_experts_per_layer`."""
    ckpt = HFCheckpoint(src)
    args, sanitize = ckpt.args, ckpt.sanitize
    E = args.experts_per_layer
    counts = {l: len(v) for l, v in (keep or {}).items()}
    keep = padded_slots(keep or {})
    replace = replace or {}
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgeMoEError(f"{out}: output directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({r.file for r in ckpt.refs}):
        names = [r.name for r in ckpt.refs if r.file == file]
        for name, t in iter_tensors(file, names):
            mapped = _probe(sanitize, name, tuple(t.shape))
            experts = {k: v for k, v in mapped.items() if EXPERT_KEY.match(k)}
            routers = [k for k in mapped if _ROUTER.match(k)]
            if experts:
                tensors.update(_rewrite_experts(sanitize, name, t, experts, keep, replace, E))
            elif routers and int(_ROUTER.match(routers[0]).group(1)) in keep and t.shape[:1] == (E,):
                layer = int(_ROUTER.match(routers[0]).group(1))
                tensors[name] = _router_rows(t, keep[layer], counts[layer], routers[0])
            else:
                tensors[name] = t
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(ckpt.config)
    if keep:
        slots = max(counts.values())
        _set_expert_count(config, E, slots)
        if len(set(counts.values())) > 1:  # per-layer counts: edgemoe's loader masks the padding
            config["edgemoe_experts_per_layer"] = {str(l): n for l, n in sorted(counts.items())}
        else:
            config.pop("edgemoe_experts_per_layer", None)
    config.update(config_updates or {})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in AUX:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, out / name)
    return out


def _rewrite_experts(sanitize, name, t, experts, keep, replace, E) -> dict[str, torch.Tensor]:
    first = EXPERT_KEY.match(next(iter(experts)))
    layer = int(first.group(1))
    ids = {int(EXPERT_KEY.match(k).group(2)) for k in experts}
    flat = t.reshape(-1).clone()
    for key, idx in experts.items():  # write replaced experts into the source layout
        m = EXPERT_KEY.match(key)
        new = replace.get((int(m.group(1)), int(m.group(2))))
        if new is not None:
            flat[idx.reshape(-1)] = new[m.group(3)].reshape(-1).to(t.dtype)
    t = flat.view(t.shape)
    if layer not in keep:
        return {name: t}
    kept = keep[layer]
    if len(ids) > 1:  # fused: one slab per expert along dim 0
        if t.shape[0] != E:
            raise EdgeMoEError(f"tensor {name!r}: expected {E} experts along its first axis, got {tuple(t.shape)}")
        _expert_axis_ok(name, experts, E, t.numel())
        return {name: t[kept].contiguous()}
    (e,) = ids
    if e not in kept:
        return {}
    # A padding slot holds a copy of the layer's first kept expert (so the store keeps one blob).
    first = kept.index(e)
    return {_renamed(sanitize, name, t, e, i): t if i == first else t.clone() for i, x in enumerate(kept) if x == e}


def padded_slots(keep: dict[int, list[int]]) -> dict[int, list[int]]:
    """Per MoE layer, the original expert each slot of the rewritten layer holds: the kept
    experts, then, up to the largest kept count of any layer, padding slots holding a copy
    of the layer's first kept expert. Padding is never routed to (its router row is zero,
    its gate and correction biases -inf, and edgemoe masks it by config), and its copy is
    stored once by `edgemoe convert` (identical blobs are shared), so it costs no bytes."""
    if not keep:
        return {}
    slots = max(len(v) for v in keep.values())
    return {l: list(v) + [v[0]] * (slots - len(v)) for l, v in keep.items()}


def _router_rows(t: torch.Tensor, slots: list[int], n: int, canonical: str) -> torch.Tensor:
    """A router tensor (E, ...) cut to the kept slots, padding rows made unroutable: a zero
    gate row, a -inf gate or correction bias (what transformers reads: with one of the
    biases it never routes to the padding either), other per-expert values copied."""
    rows = t[slots].clone()
    if len(slots) > n:
        part = canonical.rsplit(".", 1)[-1]
        if part in ("bias", "e_score_correction_bias"):
            rows[n:] = float("-inf")
        elif part == "weight":
            rows[n:] = 0
    return rows.contiguous()


def _renamed(sanitize, name: str, t: torch.Tensor, old: int, new: int) -> str:
    """The source name with expert index `old` changed to `new`: the digit run whose
    change makes sanitize name expert `new`."""
    for m in re.finditer(r"\d+", name):
        if int(m.group()) != old:
            continue
        cand = name[: m.start()] + str(new) + name[m.end():]
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        got = [k for k, _ in sanitize(cand, meta) if EXPERT_KEY.match(k)]
        if got and all(int(EXPERT_KEY.match(k).group(2)) == new for k in got):
            return cand
    raise EdgeMoEError(f"cannot renumber expert {old} in tensor name {name!r}")


def _set_expert_count(config: dict, old: int, new: int) -> None:
    targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    done = False
    for c in targets:
        for key in EXPERT_COUNT_KEYS:
            if c.get(key) == old:
                c[key] = new
                done = True
    if not done:
        raise EdgeMoEError(f"config.json: no expert-count field equal to {old} (looked for "
                           f"{', '.join(EXPERT_COUNT_KEYS)})")
