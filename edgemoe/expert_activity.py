"""Plots of expert activity from a routing trace (edgemoe.runtime.trace).

One PNG with three panels:
  - activation share: layers x experts, the share of each layer's tokens routed to each expert;
  - a routing raster: which experts the first tokens picked, layer by layer (one column per token);
  - cross-layer paths: for the consecutive MoE-layer pair with the most skewed paths,
    P(expert at layer n | expert at layer n-1). The skew of these paths is what the
    EdgeMoE path-table predictor exploits.
Plus `activity_summary`, the same numbers as a dict (for --json and tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bitwidth.plots import MISSING, _pyplot
from .runtime.trace import RoutingTrace


def activation_share(trace: RoutingTrace) -> np.ndarray:
    """(L, E) share of each MoE layer's tokens that picked each expert (rows sum to top_k)."""
    ids = trace.ids.astype(np.int64)  # (T, L, k); -1 marks a slot dropped by adaptive gating
    T, L, _ = ids.shape
    E = int(trace.header["num_experts"])
    share = np.zeros((L, E))
    for layer in range(L):
        row = ids[:, layer].reshape(-1)
        share[layer] = np.bincount(row[row >= 0], minlength=E)[:E] / max(T, 1)
    return share


def pair_counts(trace: RoutingTrace, pos: int) -> np.ndarray:
    """(E, E) how often expert i at MoE layer pos-1 and expert j at layer pos were picked
    by the same token (every top-k x top-k pair)."""
    E = int(trace.header["num_experts"])
    a, b = trace.ids[:, pos - 1].astype(np.int64), trace.ids[:, pos].astype(np.int64)  # (T, k)
    counts = np.zeros((E, E))
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            ok = (a[:, i] >= 0) & (b[:, j] >= 0)
            np.add.at(counts, (a[ok, i], b[ok, j]), 1)
    return counts


def path_matrix(trace: RoutingTrace, pos: int) -> np.ndarray:
    """(E, E) P(expert j at MoE layer pos | expert i at layer pos-1)."""
    counts = pair_counts(trace, pos)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def top_path_share(trace: RoutingTrace, pos: int, fraction: float = 0.2) -> float:
    """Share of (layer pos-1, layer pos) expert pairs covered by the most frequent `fraction` of pairs."""
    flat = np.sort(pair_counts(trace, pos).reshape(-1))[::-1]
    return float(flat[: max(1, int(round(fraction * flat.size)))].sum() / max(flat.sum(), 1e-12))


def activity_summary(trace: RoutingTrace) -> dict:
    share = activation_share(trace)
    p = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-12)
    entropy = -(p * np.log2(np.where(p > 0, p, 1))).sum(axis=1)
    skew = [top_path_share(trace, pos) for pos in range(1, share.shape[0])]
    return {"tokens": int(trace.ids.shape[0]), "moe_layers": trace.moe_layers,
            "num_experts": int(trace.header["num_experts"]), "top_k": int(trace.header["top_k"]),
            "activation_share": share.round(4).tolist(), "entropy_bits": entropy.round(3).tolist(),
            "max_entropy_bits": float(np.log2(share.shape[1])), "top20_path_share": [round(s, 4) for s in skew]}


def activity_plot(trace: RoutingTrace, path: str | Path, tokens: int = 64, title: str = "") -> str | None:
    """Draw the three panels to `path`. Returns None on success or why nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return MISSING
    share = activation_share(trace)
    L, E = share.shape
    fig, axes = plt.subplots(1, 3 if L > 1 else 2, figsize=(15 if L > 1 else 10, 4.6))
    im = axes[0].imshow(share, aspect="auto", cmap="viridis")
    axes[0].set(title="activation share (tokens routed / tokens)", xlabel="expert", ylabel="MoE layer",
                yticks=range(L), yticklabels=trace.moe_layers)
    fig.colorbar(im, ax=axes[0], fraction=0.046)

    n = min(tokens, trace.ids.shape[0])
    raster = np.full((L * E, n), 0.0)
    w = trace.weights if trace.weights is not None else np.ones(trace.ids.shape, np.float16)
    for t in range(n):
        for layer in range(L):
            for slot, e in enumerate(trace.ids[t, layer]):
                if e >= 0:
                    raster[layer * E + int(e), t] = float(w[t, layer, slot])
    axes[1].imshow(raster, aspect="auto", cmap="magma", interpolation="nearest")
    for layer in range(1, L):
        axes[1].axhline(layer * E - 0.5, color="white", lw=0.5)
    axes[1].set(title=f"routing of the first {n} tokens (colour: gate weight)", xlabel="token",
                ylabel="MoE layer / expert", yticks=[layer * E + E / 2 - 0.5 for layer in range(L)],
                yticklabels=trace.moe_layers)

    if L > 1:
        skew = [top_path_share(trace, pos) for pos in range(1, L)]
        pos = int(np.argmax(skew)) + 1
        im = axes[2].imshow(path_matrix(trace, pos), cmap="Blues", vmin=0)
        axes[2].set(title=f"P(expert at layer {trace.moe_layers[pos]} | layer {trace.moe_layers[pos - 1]})\n"
                          f"top 20% of paths cover {100 * skew[pos - 1]:.1f}% of activations",
                    xlabel=f"expert at layer {trace.moe_layers[pos]}",
                    ylabel=f"expert at layer {trace.moe_layers[pos - 1]}")
        fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.suptitle(title or f"expert activity: {trace.ids.shape[0]} tokens, {trace.header.get('model_type', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
