"""The run directory's pruning report: a per-layer widths table (markdown) and a PNG plot."""

from __future__ import annotations

from pathlib import Path

PLOT_NAME = "pruning_widths.png"
REPORT_NAME = "pruning_report.md"


def widths_table(dense_widths: list[list[int]], stage_widths: list[list[list[int]]]) -> str:
    """Markdown table: per layer, query heads / KV heads / FFN channels, dense → stage 1 → stage 2 ..."""
    rows = ["| layer | query heads | KV heads | FFN channels |", "|---:|---:|---:|---:|"]
    for i in range(len(dense_widths)):
        cols = [" → ".join(str(w[i][j]) for w in [dense_widths] + stage_widths) for j in range(3)]
        rows.append(f"| {i} | " + " | ".join(cols) + " |")
    return "\n".join(rows) + "\n"


def plot_widths(path: Path, dense_widths: list[list[int]], stage_widths: list[list[list[int]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    layers = range(len(dense_widths))
    for ax, col, title in ((axes[0], 0, "query heads"), (axes[1], 2, "FFN channels")):
        ax.plot(layers, [w[col] for w in dense_widths], "k--", label="dense")
        for s, widths in enumerate(stage_widths, 1):
            ax.plot(layers, [w[col] for w in widths], marker="o", label=f"stage {s}")
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_pruning_report(out: Path, dense_params: int, dense_widths: list[list[int]], reports: list[dict]) -> None:
    """Write `pruning_report.md` and `pruning_widths.png` into `out` for every stage pruned so far."""
    stage_widths = [[[w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]]
                     for w in (layer["widths"] for layer in r["layers"])] for r in reports]
    lines = ["# Pruning report", "", "| stage | target removed | realised removed | parameters | method | schedule | seconds |",
             "|---|---:|---:|---:|---|---|---:|", f"| dense | – | – | {dense_params:,} | | | |"]
    for s, r in enumerate(reports, 1):
        st = r["settings"]
        lines.append(f"| {s} | {r['target_fraction']:.2%} | {r['realised_fraction']:.2%} | {r['params_after']:,} "
                     f"| {st['method']} | {st['schedule']} | {r['wall_time_s']:.1f} |")
    lines += ["", "## Per-layer widths (dense → stage 1 → ...)", "", widths_table(dense_widths, stage_widths),
              f"![per-layer widths]({PLOT_NAME})", ""]
    for s, r in enumerate(reports, 1):
        lines += [f"## Stage {s} (engine report)", "", r["markdown"]]
    (out / REPORT_NAME).write_text("\n".join(lines))
    plot_widths(out / PLOT_NAME, dense_widths, stage_widths)
