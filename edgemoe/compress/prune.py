"""`edgemoe prune`: remove the least important experts of every MoE layer.

Importance is measured on calibration text (edgemoe.compress.stats: routing frequency
times the size of the expert's output). Each layer keeps the same number of experts,
the most important ones, renumbered in their original order; the router rows of the
removed experts go with them, so tokens route among the rest exactly as if the removed
experts' router logits were -inf (softmax over the remaining rows). Transformers loads
the result as an ordinary checkpoint with fewer experts per layer.

Every layer keeps the same count because transformers and edgemoe's store both describe
a model with one expert count for all MoE layers; per-layer budgets would need a
per-layer count in the config, which no family has.
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


def prune(src: str | Path, out: str | Path, drop: float | None = None, target_bytes: int | None = None,
          calib: str | Path | None = None, calib_tokens: int = 16384, context: int | None = None) -> dict:
    """Write a pruned copy of the checkpoint at `src` to `out`; returns a report."""
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
    keep = keep_count(E, args.top_k, drop, target_bytes, per_expert, L)
    stats = measure(model, ids, ctx)
    kept = kept_experts(stats, keep)
    rewrite(src, out, keep=kept)
    lost = {layer: float(s.importance.sum() - s.importance[kept[layer]].sum()) / max(float(s.importance.sum()), 1e-30)
            for layer, s in stats.layers.items()}
    return {"experts_per_layer": {"before": E, "after": keep}, "kept": {str(k): v for k, v in kept.items()},
            "expert_bytes": {"before": per_expert * L * E, "after": per_expert * L * keep},
            "importance_removed": {str(k): round(v, 4) for k, v in lost.items()}, "calib_tokens": stats.tokens}
