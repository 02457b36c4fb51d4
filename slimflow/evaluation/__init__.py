"""Evaluation: perplexity protocols, zero-shot tasks through lm-eval (with bundled offline tasks), generation
samples and run reports. Plain functions; no Lightning here.

The Lightning callback calls `evaluate_model(model, tokenizer, ...)` and `generate_samples` / `save_samples`.
"""

from __future__ import annotations

_LAZY = {
    "evaluate_model": "slimflow.evaluation.suite",
    "evaluate_perplexity": "slimflow.evaluation.perplexity",
    "PerplexityResult": "slimflow.evaluation.perplexity",
    "run_tasks": "slimflow.evaluation.zeroshot",
    "average_of_seven": "slimflow.evaluation.zeroshot",
    "generate_samples": "slimflow.evaluation.generation",
    "save_samples": "slimflow.evaluation.generation",
    "write_report": "slimflow.evaluation.report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimflow.evaluation' has no attribute {name!r}")


__all__ = list(_LAZY)
