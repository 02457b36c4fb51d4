"""What slimflow's callbacks tell the user: metrics through the Trainer's loggers, status lines, the fit summary.

Metric names (one row per event in a CSV logger, at the trainer's `global_step`):

- `pruning/stage`, `pruning/params_before`, `pruning/params_after`, `pruning/target_fraction`,
  `pruning/realised_fraction`, `pruning/seconds`, and per layer `pruning/layer_{i}/attn_error`,
  `.../ffn_error` (calibration error after compensation) and `.../attn_heads`, `.../ffn_channels` (kept);
- `eval/{dense|pruned|finetuned}/ppl` (the first perplexity spec), `.../ppl/{spec}` for every spec,
  `.../parameters`, `.../{task}` (headline metric of each zero-shot task) and `.../average`.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch import Trainer


def log_metrics(trainer: Trainer, metrics: dict) -> None:
    """Send `metrics` (numbers only) to every logger of the Trainer (CSV, TensorBoard, W&B, ...), now."""
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def say(trainer: Trainer, message: str) -> None:
    """One status line on the terminal (global rank zero only)."""
    if trainer.is_global_zero:
        print(f"slimflow: {message}", flush=True)


def spec_name(spec: str) -> str:
    """A logger-friendly name for a perplexity spec: `../data/part-007.txt.gz:128` → `part-007_128`."""
    name, _, window = spec.rpartition(":") if ":" in spec else (spec, "", "")
    stem = Path(name).name
    for suffix in (".gz", ".txt", ".json", ".jsonl", ".raw"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}_{window}" if window else stem)


def pruning_metrics(report: dict, stage: int) -> dict:
    out = {"pruning/stage": stage + 1, "pruning/params_before": report["params_before"],
           "pruning/params_after": report["params_after"], "pruning/target_fraction": report["target_fraction"],
           "pruning/realised_fraction": report["realised_fraction"], "pruning/seconds": report["wall_time_s"]}
    for layer in report["layers"]:
        prefix = f"pruning/layer_{layer['index']}"
        out.update({f"{prefix}/attn_error": layer["attn_error"], f"{prefix}/ffn_error": layer["ffn_error"],
                    f"{prefix}/attn_heads": layer["widths"]["num_attention_heads"],
                    f"{prefix}/ffn_channels": layer["widths"]["intermediate_size"]})
    return out


def evaluation_metrics(name: str, result: dict, specs: list[str]) -> dict:
    out = {f"eval/{name}/parameters": result["model"]["parameters"]}
    for i, spec in enumerate(specs):
        value = result["perplexity"].get(spec, {}).get("value")
        if i == 0:
            out[f"eval/{name}/ppl"] = value
        out[f"eval/{name}/ppl/{spec_name(spec)}"] = value
    for task, task_result in (result.get("tasks") or {}).items():
        out[f"eval/{name}/{task}"] = task_result.get("value")
    if isinstance(result.get("average"), dict):
        out[f"eval/{name}/average"] = result["average"].get("value")
    return {k: v for k, v in out.items() if v is not None}


def _millions(n: int | None) -> str:
    return f"{n / 1e6:.2f}M" if n else "?"


def fit_summary(trainer: Trainer, seconds: float | None = None) -> str:
    """A few lines for the end of `fit`: perplexities, parameter counts and where the outputs went."""
    from slimflow.lightning.access import slimflow_callbacks
    from slimflow.lightning.outputs import Evaluation, Export
    from slimflow.lightning.pruning import StructuredPruning

    root = Path(trainer.default_root_dir)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = [f"slimflow: fit finished{took}; run directory {root}"]
    evaluation = next(iter(slimflow_callbacks(trainer, Evaluation)), None)
    if evaluation is not None:
        summary = evaluation.summary()
        names = [n for n in ("dense", "pruned", "finetuned") if n in summary]
        if summary.get("spec") and names:
            values = " | ".join(f"{n} {summary[n]['ppl']:.2f}" for n in names if summary[n]["ppl"] is not None)
            lines.append(f"  perplexity ({summary['spec']}): {values}")
        if names:
            lines.append("  parameters: " + " | ".join(f"{n} {summary[n]['parameters']:,}" for n in names))
    pruning = next(iter(slimflow_callbacks(trainer, StructuredPruning)), None)
    if pruning is not None and pruning.last_report:
        r = pruning.last_report
        lines.append(f"  pruned: {r['realised_fraction']:.2%} of {_millions(r['reference_params'])} parameters "
                     f"removed (target {r['target_fraction']:.2%}), {_millions(r['params_after'])} left")
    candidates = []
    if evaluation is not None:
        candidates += [Path(evaluation.dirpath or root) / n for n in (evaluation.filename, "samples.md")]
    if pruning is not None:
        candidates.append(Path(pruning.dirpath or root) / "pruning_report.md")
    outputs = [str(path) for path in candidates if path.is_file()]
    for export in slimflow_callbacks(trainer, Export):
        outputs += [str(export._dir(trainer) / part) for part in ("model", "adapter", "base")
                    if (export._dir(trainer) / part).is_dir()]
    for callback in trainer.checkpoint_callbacks:
        for path in {getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")}:
            if path:
                outputs.append(path)
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        outputs.append(str(trainer.logger.log_dir))
    if outputs:
        lines.append("  outputs:")
        lines += [f"    {path}" for path in dict.fromkeys(outputs)]
    return "\n".join(lines)
