"""PNG plots of a profile (frequency and sensitivity heatmaps, layers x experts) and of
a plan (the bit map). matplotlib is optional (the `plot` extra): without it the plots
are skipped with a message, and the JSON outputs are written all the same."""

from __future__ import annotations

import math
from pathlib import Path

MISSING = "matplotlib is not installed, so no PNG was drawn (pip install 'edgemoe[plot]' or pip install matplotlib)"


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or None if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(profile: dict, value) -> list[list[float]]:
    shape = profile["shape"]
    by = {(x["layer"], x["expert"]): x for x in profile["experts"]}
    return [[value(by[(l, e)]) for e in range(shape["experts_per_layer"])] for l in shape["moe_layers"]]


def _annotate(ax, im, grid, fmt, small: bool, drawn=None) -> None:
    """Write each cell's value, dark on the bright end of the colour map (`drawn`: the
    values the image shows, if they differ from the labels)."""
    if not small:
        return
    drawn = drawn or grid
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            bright = float(im.norm(drawn[i][j])) > 0.6
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=6, color="black" if bright else "white")


def profile_heatmap(profile: dict, path: str | Path) -> str | None:
    """Draw frequency and sensitivity (lowest format and, if profiled, int4) heatmaps.
    Returns None on success or the reason nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return MISSING
    from matplotlib.colors import LogNorm

    shape = profile["shape"]
    formats = profile["formats"]
    top = profile["top_format"]
    lower = sorted((f for f in formats if f != top), key=lambda f: (formats[f]["bytes"], f))
    shown = [lower[0]] if lower else []
    for f in ("int4", "int3"):
        if f in formats and f not in shown and f != top:
            shown.append(f)
            break
    L, E = len(shape["moe_layers"]), shape["experts_per_layer"]
    small = L * E <= 256
    panels = 1 + len(shown)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 + 0.35 * E * panels, 1.6 + 0.35 * L), squeeze=False)
    axes = axes[0]
    freq = _grid(profile, lambda x: 100 * x["frequency"])
    im = axes[0].imshow(freq, cmap="viridis", aspect="auto")
    axes[0].set_title("activation frequency\n(% of tokens routed)", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    _annotate(axes[0], im, freq, lambda v: f"{v:.0f}", small)
    for ax, f in zip(axes[1:], shown):
        # Predicted relative perplexity increase in %, on a log scale (zero at the floor).
        grid = _grid(profile, lambda x: 100 * math.expm1(x["sensitivity"][f]))
        pos = [v for row in grid for v in row if v > 0]
        floor = max(min(pos), max(pos) * 1e-4) if pos else 1e-6
        clipped = [[max(v, floor) for v in row] for row in grid]
        top_v = max(max(pos) if pos else floor * 10, floor * 10)
        im = ax.imshow(clipped, cmap="magma", aspect="auto", norm=LogNorm(vmin=floor, vmax=top_v))
        ax.set_title(f"sensitivity to {f}\n(predicted ppl increase, %)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        _annotate(ax, im, grid, lambda v: f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}", small, clipped)
    for ax in axes:
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        ax.set_yticklabels([str(l) for l in shape["moe_layers"]])
    fig.suptitle(f"expert profile: {Path(profile.get('model', '')).name or profile['model_type']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plan_bitmap(formats: dict[tuple[int, int], str], bits: dict[str, float], path: str | Path, title: str) -> str | None:
    """Draw the bit map of a plan: layers x experts, colour = bits per weight, each cell
    labelled with its format. Returns None on success or the reason nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return MISSING
    from matplotlib.colors import LogNorm

    layers = sorted({l for l, _ in formats})
    E = max(e for _, e in formats) + 1
    grid = [[bits[formats[(l, e)]] for e in range(E)] for l in layers]
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * E, 1.4 + 0.4 * len(layers)))
    im = ax.imshow(grid, cmap="RdYlGn", aspect="auto", norm=LogNorm(vmin=2, vmax=16))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("bits per weight")
    ticks = [2, 3, 4, 8, 16]
    cb.set_ticks(ticks)
    cb.set_ticklabels([str(t) for t in ticks])
    cb.minorticks_off()
    if len(layers) * E <= 256:
        for i, l in enumerate(layers):
            for e in range(E):
                ax.text(e, i, formats[(l, e)].replace("-asym", "a"), ha="center", va="center", fontsize=6)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l) for l in layers])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
