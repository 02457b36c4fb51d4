"""Compare runs: a markdown table and PNG plots from each run's `metrics.json` and optional `pruning.json`.

A run is a directory (or a `metrics.json` file). What is read, all optional except `metrics.json`:
- `metrics.json`: the dict `evaluate_model` returns (`perplexity`, `tasks`, `average`, `model.parameters`).
- `pruning.json` (as `slimflow prune` and `slimflow fit` write it): `params_before`, `params_after` (ints);
  `realised_fraction` / `ratio` / `target_ratio` / `pruning_ratio` (float);
  per-layer widths under `layers` (or `layer_widths` / `widths`): a list with one entry per layer, each either a
  dict with `num_attention_heads`, `num_key_value_heads`, `intermediate_size` (possibly nested under `widths`)
  or a list `[num_attention_heads, num_key_value_heads, intermediate_size]`.
- `config.json`: `slimflow_layer_widths` (same per-layer forms) when `pruning.json` has no layers; a dense
  config's `num_attention_heads` / `intermediate_size` / `num_hidden_layers` give uniform widths.

The pruning ratio is `1 - params_after / params_before` when both are known, else the recorded ratio, else
`1 - parameters / largest parameters among the runs` (the largest run is taken as dense).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from slimflow.errors import InvalidValueError, MissingInputError

WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


@dataclass
class Run:
    name: str
    path: Path
    metrics: dict
    pruning: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    parameters: int | None = None
    ratio: float | None = None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _layer_widths(entries) -> list[dict]:
    out = []
    for entry in entries or []:
        if isinstance(entry, dict) and "widths" in entry:
            entry = entry["widths"]
        if isinstance(entry, dict):
            out.append({k: entry.get(k) for k in WIDTH_KEYS})
        elif isinstance(entry, (list, tuple)) and len(entry) == 3:
            out.append(dict(zip(WIDTH_KEYS, entry)))
    return out


def load_run(path: str | Path) -> Run:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    metrics = _read_json(path if path.is_file() else folder / "metrics.json")
    if metrics is None:
        raise MissingInputError(f"{folder}/metrics.json not found; run `slimflow eval --output {folder}/metrics.json` first")
    pruning = _read_json(folder / "pruning.json") or {}
    if pruning.get("dense_params") and pruning.get("reports") and not pruning.get("params_after"):
        # a `slimflow fit` run written before pruning.json carried the `slimflow prune` keys
        pruning = {**pruning, "params_before": pruning["dense_params"],
                   "params_after": pruning["reports"][-1]["params_after"]}
    config = _read_json(folder / "config.json") or {}
    layers = _layer_widths(pruning.get("layers") or pruning.get("layer_widths") or pruning.get("widths"))
    if not layers:
        layers = _layer_widths(config.get("slimflow_layer_widths"))
    if not layers and config.get("num_hidden_layers"):
        dense = {k: config.get(k) for k in WIDTH_KEYS}
        dense["num_key_value_heads"] = dense["num_key_value_heads"] or dense["num_attention_heads"]
        layers = [dict(dense) for _ in range(config["num_hidden_layers"])]
    parameters = pruning.get("params_after") or (metrics.get("model") or {}).get("parameters")
    ratio = None
    if pruning.get("params_before") and pruning.get("params_after"):
        ratio = 1 - pruning["params_after"] / pruning["params_before"]
    else:
        ratio = next((pruning[k] for k in ("realised_fraction", "ratio", "target_ratio", "pruning_ratio")
                      if pruning.get(k) is not None), None)
    return Run(folder.name, folder, metrics, pruning, layers, parameters, ratio)


def _fill_ratios(runs: list[Run]) -> None:
    largest = max((r.parameters for r in runs if r.parameters), default=None)
    for run in runs:
        if run.ratio is None and run.parameters and largest:
            run.ratio = 1 - run.parameters / largest


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(runs: list[Run]) -> str:
    specs = list(dict.fromkeys(s for r in runs for s in r.metrics.get("perplexity", {})))
    tasks = list(dict.fromkeys(t for r in runs for t in r.metrics.get("tasks", {})))
    header = ["run", "parameters", "pruned"] + [f"PPL {s}" for s in specs]
    header += [f"{t} ({_task_metric(runs, t)})" for t in tasks] + ["avg-7"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        row = [run.name, f"{run.parameters:,}" if run.parameters else "–",
               f"{100 * run.ratio:.1f}%" if run.ratio is not None else "–"]
        row += [_fmt(run.metrics["perplexity"].get(s, {}).get("value")) for s in specs]
        row += [_fmt(_pct(run.metrics["tasks"].get(t, {}).get("value"))) for t in tasks]
        average = (run.metrics.get("average") or {})
        avg = _fmt(_pct(average.get("value")))
        row.append(avg + ("" if average.get("complete", True) or average.get("value") is None else "*"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _task_metric(runs: list[Run], task: str) -> str:
    return next((r.metrics["tasks"][task].get("metric") for r in runs if task in r.metrics.get("tasks", {})), "")


def _pct(value):
    return 100 * value if isinstance(value, (int, float)) else None


def plot_perplexity(runs: list[Run], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(s for r in runs for s in r.metrics.get("perplexity", {})))
    if not specs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in specs:
        points = sorted((r.ratio, r.metrics["perplexity"][spec]["value"]) for r in runs
                        if r.ratio is not None and spec in r.metrics.get("perplexity", {}))
        if points:
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=spec)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Perplexity vs pruning ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_widths(runs: list[Run], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.layers]
    if not runs:
        return None
    fig, (heads_ax, channels_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        x = list(range(len(run.layers)))
        heads_ax.plot(x, [w["num_attention_heads"] for w in run.layers], marker=".", label=run.name)
        channels_ax.plot(x, [w["intermediate_size"] for w in run.layers], marker=".", label=run.name)
    heads_ax.set_title("kept attention heads per layer")
    channels_ax.set_title("kept FFN channels per layer")
    for ax in (heads_ax, channels_ax):
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    heads_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_paths: list[str], output: str | Path) -> dict:
    """Write `report.md`, `perplexity_vs_ratio.png` and `layer_widths.png` into `output`; returns the paths."""
    runs = [load_run(p) for p in run_paths]
    if not runs:
        raise InvalidValueError("give at least one run directory")
    _fill_ratios(runs)
    runs.sort(key=lambda r: (r.ratio if r.ratio is not None else 0.0, r.name))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ppl_png = plot_perplexity(runs, output / "perplexity_vs_ratio.png")
    widths_png = plot_layer_widths(runs, output / "layer_widths.png")
    lines = ["# slimflow report", "", markdown_table(runs), "",
             "Task columns are accuracy in % with the metric in brackets (METHODS §10 rule); avg-7 is the "
             "unweighted mean of BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA (* = not all seven present).",
             ""]
    limits = {r.name: (r.metrics.get("protocol") or {}).get("limit") for r in runs}
    if any(limits.values()):
        lines += [f"Task limits (documents per task): {limits}", ""]
    for png in (ppl_png, widths_png):
        if png:
            lines += [f"![{png.stem}]({png.name})", ""]
    (output / "report.md").write_text("\n".join(lines))
    return {"report": str(output / "report.md"), "plots": [str(p) for p in (ppl_png, widths_png) if p]}
