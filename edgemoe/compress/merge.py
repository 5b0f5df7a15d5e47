"""`edgemoe merge`: fold the experts of every MoE layer into fewer "super experts".

Following MC-SMoE ("Merge, then compress", Li et al., ICLR 2024), per layer:
1. the N most frequently routed experts (on calibration text) become group centres;
2. every other expert joins the centre whose outputs on the layer's calibration inputs
   are most alike (cosine similarity of the flattened outputs: output-space grouping);
3. each member's hidden units are aligned to the centre's before averaging, because two
   experts can compute the same function with their intermediate units in another order.
   Unit i of the centre is matched to unit j of the member by the similarity of their
   weights [gate row, up row, down column]; MC-SMoE solves this matching optimally
   (Hungarian algorithm), here it is greedy (best pair first), which needs no solver;
4. the group's weights are averaged, each member weighted by its routing frequency.

The router is left unchanged: its logits still choose among the original expert ids,
and every id of a group now holds the same merged weights. `edgemoe convert` stores one
blob per distinct expert, so the expert store and cache hold a group once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from ..evaluate import checkpoint_expert_bytes
from .rewrite import rewrite
from .stats import LayerStats, calibration, measure


def group_experts(stats: LayerStats, outputs: torch.Tensor, n: int) -> list[list[int]]:
    """Groups (centre first) from frequencies (E,) and outputs (E, S, H) on the sample."""
    E = outputs.shape[0]
    centres = sorted(range(E), key=lambda e: (-float(stats.frequency[e]), e))[:n]
    flat = F.normalize(outputs.reshape(E, -1).double(), dim=-1)  # (E, S*H)
    sim = flat @ flat.T  # (E, E) cosine
    groups = {c: [c] for c in centres}
    for e in range(E):
        if e not in groups:
            best = max(centres, key=lambda c: (float(sim[e, c]), -c))
            groups[best].append(e)
    return [groups[c] for c in centres]


def align(centre: dict[str, torch.Tensor], member: dict[str, torch.Tensor]) -> torch.Tensor:
    """perm (I,) such that member unit perm[i] is matched to centre unit i (greedy
    maximum-similarity matching of the units' weight vectors)."""
    def units(w):  # (I, 2H + H): each intermediate unit's gate row, up row and down column
        return F.normalize(torch.cat([w["gate"], w["up"], w["down"].T], dim=1).double(), dim=-1)

    sim = units(centre) @ units(member).T  # (I, I)
    I = sim.shape[0]
    perm = torch.empty(I, dtype=torch.long)
    for _ in range(I):  # take the best remaining pair, then retire its row and column
        i, j = divmod(int(torch.argmax(sim)), I)
        perm[i] = j
        sim[i, :] = -torch.inf
        sim[:, j] = -torch.inf
    return perm


def merge_group(weights: list[dict[str, torch.Tensor]], freq: list[float]) -> dict[str, torch.Tensor]:
    """Frequency-weighted average of the members (first is the centre) after alignment."""
    total = sum(freq)
    alpha = [f / total for f in freq] if total > 0 else [1 / len(freq)] * len(freq)
    centre = weights[0]
    out = {k: alpha[0] * v.double() for k, v in centre.items()}
    for w, a in zip(weights[1:], alpha[1:]):
        p = align(centre, w)
        out["gate"] += a * w["gate"][p].double()  # (I, H) rows permuted
        out["up"] += a * w["up"][p].double()
        out["down"] += a * w["down"][:, p].double()  # (H, I) columns permuted
    return {k: v.float() for k, v in out.items()}


def merge(src: str | Path, out: str | Path, experts_per_layer: int | None = None, target_bytes: int | None = None,
          calib: str | Path | None = None, calib_tokens: int = 16384, context: int | None = None) -> dict:
    """Write a merged copy of the checkpoint at `src` to `out`; returns a report."""
    if (experts_per_layer is None) == (target_bytes is None):
        raise InvalidArgument("give exactly one of --experts-per-layer and --target-size")
    model, ckpt, ids, ctx = calibration(src, calib, calib_tokens, context)
    args = ckpt.args
    L, E, k = len(args.moe_layers()), args.experts_per_layer, args.top_k
    per_expert = checkpoint_expert_bytes(ckpt) // (L * E)
    n = experts_per_layer if experts_per_layer is not None else target_bytes // (per_expert * L)
    if not 1 <= n < E:
        raise InvalidArgument(f"merging to {n} experts per layer: must be between 1 and {E - 1}")
    stats = measure(model, ids, ctx)
    table = next(model.moe_blocks()).provider.table
    replace, report = {}, {}
    for layer, s in stats.layers.items():
        x = s.sample  # (S, H)
        with torch.inference_mode():
            outputs = torch.stack([table[(layer, e)](x) for e in range(E)])  # (E, S, H)
        groups = group_experts(s, outputs, n)
        for g in groups:
            ws = [_weights(table[(layer, e)]) for e in g]
            merged = merge_group(ws, [float(s.frequency[e]) for e in g])
            for e in g:
                replace[(layer, e)] = merged
        report[str(layer)] = groups
    rewrite(src, out, replace=replace)
    return {"experts_per_layer": {"before": E, "distinct_after": n, "top_k": k}, "groups": report,
            "expert_bytes": {"before": per_expert * L * E, "after_shared": per_expert * L * n},
            "calib_tokens": stats.tokens}


def _weights(expert) -> dict[str, torch.Tensor]:
    """gate (I, H), up (I, H), down (H, I) of an in-RAM DenseExpert."""
    if getattr(expert, "b13", None) is not None or getattr(expert, "b2", None) is not None:
        raise InvalidArgument("merging experts with biases is not supported")
    gate, up = expert.w13.chunk(2, dim=0)
    return {"gate": gate, "up": up, "down": expert.w2}
