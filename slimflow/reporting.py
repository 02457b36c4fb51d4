"""Per-layer width reports: a markdown table and a PNG plot, from a `PruneReport` or its `pruning.json`."""

from __future__ import annotations

from pathlib import Path


def _layer_widths(report: dict) -> tuple[list[int], list[int], list[int]]:
    layers = report["layers"]
    heads = [layer["widths"]["num_attention_heads"] for layer in layers]
    channels = [layer["widths"]["intermediate_size"] for layer in layers]
    before = [layer.get("heads_before", h) for layer, h in zip(layers, heads)]
    return heads, channels, before


def plot_widths(report: dict, path: str | Path, title: str | None = None) -> Path:
    """Bar plot of kept heads and FFN channels per layer (with the dense widths as outlines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, channels, heads_before = _layer_widths(report)
    channels_before = [layer.get("channels_before", c) for layer, c in zip(report["layers"], channels)]
    x = list(range(len(heads)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, len(x) * 0.35), 5.5), sharex=True)
    ax1.bar(x, heads_before, color="none", edgecolor="grey", label="before")
    ax1.bar(x, heads, color="tab:blue", label="kept")
    ax1.set_ylabel("attention heads")
    ax1.legend(loc="lower left", fontsize=8)
    ax2.bar(x, channels_before, color="none", edgecolor="grey")
    ax2.bar(x, channels, color="tab:orange")
    ax2.set_ylabel("FFN channels")
    ax2.set_xlabel("layer")
    frac = report.get("realised_fraction")
    fig.suptitle(title or f"slimflow per-layer widths" + (f" ({frac:.1%} of parameters removed)" if frac else ""))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
