"""`evaluate_model`: perplexities and zero-shot tasks of an in-memory model, as one JSON-serialisable dict.

This is the function the Lightning callback and `slimflow eval` both call; the dict is the `metrics.json` format
that `slimflow report` reads.
"""

from __future__ import annotations

import datetime
import platform
import time

import torch

from slimflow.evaluation.perplexity import evaluate_perplexity, model_device, parse_spec
from slimflow.evaluation.zeroshot import average_of_seven, resolve_tasks, run_tasks

PERPLEXITY_PROTOCOL = (
    'tokenise "\\n\\n".join(texts) once (one BOS at the start), cut floor(len/T) non-overlapping windows '
    "(tail dropped), score each window alone over its T-1 next-token positions, PPL = exp(mean NLL)"
)
METRICS_FORMAT_VERSION = 1


def split_list(values) -> list[str]:
    """`["a,b", "c"]` or `"a,b"` -> `["a", "b", "c"]` (comma-separated lists are accepted everywhere)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _versions() -> dict:
    import lm_eval
    import transformers

    try:
        from importlib.metadata import version

        lm_eval_version = version("lm_eval")
    except Exception:
        lm_eval_version = getattr(lm_eval, "__version__", "unknown")
    return {"lm_eval": lm_eval_version, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def evaluate_model(model, tokenizer, ppl: list[str] = ["wikitext2:128"], tasks: list[str] = [],
                   limit: int | None = None, batch_size: int = 8, max_windows: int | None = None,
                   device=None, max_tokens: int | None = None, task_source: str = "auto", data_dir=None,
                   progress: bool = True) -> dict:
    """Evaluate an in-memory causal LM: perplexity specs and zero-shot tasks.

    Args:
        model: a Hugging Face causal LM (dense or pruned), already on its device.
        tokenizer: its tokenizer.
        ppl: perplexity specs `NAME:WINDOW[:MAX_TOKENS]` (see `slimflow.evaluation.perplexity`).
        tasks: zero-shot task names (see `slimflow.evaluation.zeroshot` for how names resolve offline).
        limit: documents per task (lm-eval `limit`); None for the full sets.
        batch_size: windows per forward pass for perplexity, and lm-eval's batch size.
        max_windows: score at most this many windows per perplexity spec.
        device: move the model there first; None keeps it where it is.
        max_tokens: keep only the first tokens of each perplexity text (a spec's third field wins).
        task_source: "auto", "local" or "hub".
        data_dir: shared data folder; None resolves `$SLIMFLOW_DATA` or `../shared/data`.
        progress: show progress bars.

    Returns:
        `{"perplexity": {spec: result}, "tasks": {name: result}, "average": ..., "protocol": ..., ...}`.
    """
    ppl, tasks = split_list(ppl), split_list(tasks)
    for spec in ppl:
        parse_spec(spec)  # fail on a bad spec before spending time on anything else
    resolve_tasks(tasks, task_source, data_dir)
    if device is not None:
        model.to(device)
    started = time.perf_counter()
    texts_cache: dict = {}
    perplexity = {}
    for spec in ppl:
        result = evaluate_perplexity(model, tokenizer, spec, batch_size=batch_size, max_windows=max_windows,
                                     max_tokens=max_tokens, data_dir=data_dir, progress=progress,
                                     texts_cache=texts_cache)
        perplexity[spec] = result.to_dict()
    ppl_seconds = time.perf_counter() - started
    task_results = run_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size,
                             task_source=task_source, data_dir=data_dir)
    return {
        "format_version": METRICS_FORMAT_VERSION,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {
            "name_or_path": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
            "parameters": count_parameters(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(model_device(model)),
        },
        "perplexity": perplexity,
        "tasks": task_results,
        "average": average_of_seven(task_results) if task_results else None,
        "protocol": {
            "perplexity": PERPLEXITY_PROTOCOL,
            "max_windows": max_windows,
            "max_tokens": max_tokens,
            "zero_shot": "lm-eval simple_evaluate, 0-shot log-likelihood multiple choice, HFLM over the in-memory model",
            "limit": limit,
            "batch_size": batch_size,
            "task_source": task_source,
        },
        "versions": _versions(),
        "seconds": {"perplexity": round(ppl_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
