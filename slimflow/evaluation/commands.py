"""`slimflow eval` and `slimflow report`: their signatures and docstrings are the command-line schema."""

from __future__ import annotations

import json
from pathlib import Path

from slimflow.errors import InvalidValueError


def eval(  # noqa: A001 - the subcommand is called eval
    model: str | None = None,
    ppl: list[str] | str = ["wikitext2:128"],
    tasks: list[str] | str = [],
    limit: int | None = None,
    batch_size: int = 8,
    output: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_windows: int | None = None,
    max_tokens: int | None = None,
    task_source: str = "auto",
    data_dir: str | None = None,
    samples: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate a model: perplexity protocols and zero-shot tasks; writes metrics.json.

    Args:
        model: model directory (a slimflow pruned checkpoint or any HF causal LM) or a Hugging Face Hub id
            (required).
        ppl: perplexity specs NAME:WINDOW[:MAX_TOKENS], comma-separated or repeated: wikitext2:128,
            wikitext2:2048, c4:128, c4:2048, ptb:128, or PATH:WINDOW for a local .txt/.gz/.json/.jsonl file
            (e.g. ../shared/pretrain_corpus/part-007.txt.gz:128:400000). Empty list for none.
        tasks: zero-shot tasks, comma-separated: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
            openbookqa, lambada_openai (bundled offline definitions over local files), or any lm-eval task name.
        limit: documents per task (for quick runs); None evaluates the full sets.
        batch_size: perplexity windows per forward pass and lm-eval batch size.
        output: where to write the metrics JSON (a directory gets metrics.json inside); None prints only.
        dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16.
        device: auto, cpu, cuda, cuda:1, ...
        max_windows: score at most this many windows per perplexity spec.
        max_tokens: keep only the first tokens of each perplexity text.
        task_source: auto (bundled local definition when its data file is found, else the Hub), local or hub.
        data_dir: shared data folder; default $SLIMFLOW_DATA, else ../shared/data next to the repo.
        samples: also write this many greedy generation samples (default prompts) next to the output.
        progress: show progress bars.
    """
    from slimflow.errors import require_existing
    from slimflow.evaluation.generation import DEFAULT_PROMPTS, generate_samples, save_samples
    from slimflow.evaluation.perplexity import PRESETS, parse_spec
    from slimflow.evaluation.suite import evaluate_model, split_list
    from slimflow.evaluation.zeroshot import resolve_tasks
    from slimflow.models import check_model_source, load_model, load_tokenizer, resolve_device, resolve_dtype

    if not model:
        raise InvalidValueError("give the model to evaluate: slimflow eval --model DIR_OR_HUB_ID")
    ppl, tasks = split_list(ppl), split_list(tasks)
    # every option is checked before the model loads
    for spec in ppl:
        name = parse_spec(spec)[0]
        if name not in PRESETS:
            require_existing(name, "perplexity text")
    resolve_tasks(tasks, task_source, data_dir)
    resolve_dtype(dtype, resolve_device(device))
    for option, value in (("--batch-size", batch_size), ("--limit", limit), ("--max-windows", max_windows),
                          ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise InvalidValueError(f"{option} must be ≥ 1, got {value}")
    if samples < 0:
        raise InvalidValueError(f"--samples must be ≥ 0, got {samples}")
    check_model_source(model)
    lm = load_model(model, dtype=dtype, device=device, progress=progress).eval()
    tokenizer = load_tokenizer(model)
    metrics = evaluate_model(lm, tokenizer, ppl=ppl, tasks=tasks, limit=limit, batch_size=batch_size,
                             max_windows=max_windows, max_tokens=max_tokens, task_source=task_source,
                             data_dir=data_dir, progress=progress)
    metrics["model"]["name_or_path"] = model
    metrics["command"] = {"model": model, "ppl": ppl, "tasks": tasks, "limit": limit, "batch_size": batch_size,
                          "dtype": dtype, "device": device, "max_windows": max_windows, "max_tokens": max_tokens,
                          "task_source": task_source, "data_dir": data_dir}
    if output:
        path = Path(output)
        path = path / "metrics.json" if path.is_dir() or not path.suffix else path
        path.parent.mkdir(parents=True, exist_ok=True)
        if samples:
            drawn = generate_samples(lm, tokenizer, DEFAULT_PROMPTS[:samples])
            json_path, _ = save_samples(drawn, path.with_name("samples.json"), metadata={"model": model})
            metrics["samples"] = str(json_path)
        path.write_text(json.dumps(metrics, indent=2))
        print(f"wrote {path}")
    print(summary(metrics))
    return metrics


def summary(metrics: dict) -> str:
    lines = []
    for spec, result in metrics.get("perplexity", {}).items():
        lines.append(f"PPL {spec}: {result['value']:.3f} ({result['num_windows']} windows, {result['num_tokens']} tokens)")
    for name, result in metrics.get("tasks", {}).items():
        value = result.get("value")
        shown = f"{100 * value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{name} [{result['source']}] {result['metric']}: {shown} (n={result.get('num_samples')})")
    average = metrics.get("average") or {}
    if average.get("value") is not None:
        lines.append(f"average of {len(average['tasks'])}/7: {100 * average['value']:.2f}")
    return "\n".join(lines)


def report(runs: list[str] | str, output: str = "report") -> dict:
    """Compare evaluated runs: a markdown table and PNG plots (`slimflow report RUN_DIR [RUN_DIR ...]`).

    Args:
        runs: run or model directories (several, or comma-separated), each with metrics.json (from slimflow eval
            or slimflow fit) and optionally pruning.json (params_before, params_after, per-layer widths).
        output: directory for report.md, perplexity_vs_ratio.png and layer_widths.png.
    """
    from slimflow.evaluation.report import write_report
    from slimflow.evaluation.suite import split_list

    written = write_report(split_list(runs), output)
    print(f"wrote {written['report']}")
    return written
