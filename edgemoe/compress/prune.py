"""`edgemoe prune`: remove the least important experts of every MoE layer.

Importance is measured on calibration text (edgemoe.compress.stats: routing frequency
times the size of the expert's output). By default each layer keeps the same number of
experts, the most important ones, renumbered in their original order; the router rows of
the removed experts go with them, so tokens route among the rest exactly as if the
removed experts' router logits were -inf (softmax over the remaining rows). Transformers
loads the result as an ordinary checkpoint with fewer experts per layer.

With `per_layer`, experts are ranked over all layers at once (every layer keeps at least
top_k), so a layer whose experts matter more keeps more of them. transformers and the
expert store describe a model with one expert count for all layers, so the written model
has as many expert slots as the layer that keeps most, and the other layers pad theirs
(`rewrite.padded_slots`): a padding slot holds a copy of the layer's first kept expert
(convert stores identical experts once: no bytes) and is never routed to. edgemoe knows
the padding from config.json's `edgemoe_experts_per_layer` and masks its router logits
to -inf (`Router.limit`), which is exactly removing the rows. transformers ignores that
key: it routes exactly as edgemoe only where the router has a gate bias or a correction
bias (set to -inf on the padding); a router without either (Mixtral, Qwen2-MoE, OLMoE,
...) gives the padding's zero row a logit of 0, so transformers would route tokens to it
(README: "Not finished").
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidArgument
from ..evaluate import checkpoint_expert_bytes
from .rewrite import rewrite
from .stats import ExpertStats, calibration, measure


def kept_experts(stats: ExpertStats, keep: int) -> dict[int, list[int]]:
    """Per layer, the `keep` most important expert ids, in ascending id order."""
    out = {}
    for layer, s in stats.layers.items():
        order = sorted(range(len(s.importance)), key=lambda e: (-float(s.importance[e]), e))
        out[layer] = sorted(order[:keep])
    return out


def keep_count(num_experts: int, top_k: int, drop: float | None, target_bytes: int | None,
               expert_bytes: int, moe_layers: int) -> int:
    """Experts each layer keeps for a dropped fraction or a total expert-bytes target."""
    if drop is not None:
        if not 0 < drop < 1:
            raise InvalidArgument(f"--drop must be in (0, 1), got {drop}")
        keep = round(num_experts * (1 - drop))
    else:
        keep = target_bytes // (expert_bytes * moe_layers)
    if keep < top_k:
        raise InvalidArgument(f"pruning to {keep} experts per layer leaves fewer than the {top_k} each token uses")
    if keep >= num_experts:
        raise InvalidArgument(f"nothing to prune: {keep} of {num_experts} experts per layer would stay")
    return keep


def kept_globally(stats: ExpertStats, total: int, top_k: int) -> dict[int, list[int]]:
    """The `total` most important experts over all layers, every layer keeping at least
    its `top_k` most important ones; per layer, in ascending id order."""
    layers = stats.layers
    if total < top_k * len(layers):
        raise InvalidArgument(f"keeping {total} experts in all leaves fewer than the {top_k} each token uses in "
                              f"each of the {len(layers)} MoE layers")
    out: dict[int, list[int]] = {}
    rest = []
    for layer, s in layers.items():
        order = sorted(range(len(s.importance)), key=lambda e: (-float(s.importance[e]), e))
        out[layer] = order[:top_k]
        rest += [(-float(s.importance[e]), layer, e) for e in order[top_k:]]
    for _, layer, e in sorted(rest)[: total - top_k * len(layers)]:
        out[layer].append(e)
    return {layer: sorted(v) for layer, v in out.items()}


def prune(src: str | Path, out: str | Path, drop: float | None = None, target_bytes: int | None = None,
          calib: str | Path | None = None, calib_tokens: int = 16384, context: int | None = None,
          per_layer: bool = False) -> dict:
    """Write a pruned copy of the checkpoint at `src` to `out`; returns a report.
    per_layer: rank experts over all layers (per-layer budgets) instead of keeping the
    same share of each layer."""
    if (drop is None) == (target_bytes is None):
        raise InvalidArgument("give exactly one of --drop and --target-size")
    model, ckpt, ids, ctx = calibration(src, calib, calib_tokens, context)
    args = ckpt.args
    groups = getattr(next(model.moe_blocks()).router, "n_group", 1)
    if groups > 1:
        raise InvalidArgument(f"{src}: the router picks experts in {groups} groups; pruning would break the "
                              "groups (not supported)")
    L, E = len(args.moe_layers()), args.experts_per_layer
    per_expert = checkpoint_expert_bytes(ckpt) // (L * E)
    if args.routable_experts() is not None:
        raise InvalidArgument(f"{src}: already pruned per layer (config.json has edgemoe_experts_per_layer); "
                              "prune the original model instead")
    if per_layer:
        total = (round(L * E * (1 - drop)) if drop is not None else target_bytes // per_expert)
        if drop is not None and not 0 < drop < 1:
            raise InvalidArgument(f"--drop must be in (0, 1), got {drop}")
        if total >= L * E:
            raise InvalidArgument(f"nothing to prune: {total} of {L * E} experts would stay")
        if total < args.top_k * L:
            raise InvalidArgument(f"keeping {total} experts in all leaves fewer than the {args.top_k} each token "
                                  f"uses in each of the {L} MoE layers")
    else:
        keep = keep_count(E, args.top_k, drop, target_bytes, per_expert, L)
    stats = measure(model, ids, ctx)
    kept = kept_globally(stats, total, args.top_k) if per_layer else kept_experts(stats, keep)
    rewrite(src, out, keep=kept)
    lost = {layer: float(s.importance.sum() - s.importance[kept[layer]].sum()) / max(float(s.importance.sum()), 1e-30)
            for layer, s in stats.layers.items()}
    counts = {layer: len(v) for layer, v in kept.items()}
    after = counts[next(iter(counts))] if len(set(counts.values())) == 1 else {str(k): v for k, v in counts.items()}
    return {"experts_per_layer": {"before": E, "after": after}, "kept": {str(k): v for k, v in kept.items()},
            # padding slots copy a kept expert: the store holds them once, in its blob
            "expert_bytes": {"before": per_expert * L * E, "after": per_expert * sum(counts.values())},
            "importance_removed": {str(k): round(v, 4) for k, v in lost.items()}, "calib_tokens": stats.tokens}
