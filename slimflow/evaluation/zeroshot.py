"""Zero-shot tasks through lm-eval as a library, with bundled task definitions over local files.

Task names and where their data comes from (`task_source`):
- `slimflow_<task>` always uses the bundled definition in `slimflow/evaluation/tasks/` over local files.
- A standard name with a bundled twin (`boolq`, `piqa`, `hellaswag`, `winogrande`, `arc_easy`,
  `arc_challenge`, `openbookqa`, `lambada_openai`):
  - `task_source="auto"` (default): the bundled definition if its local file is found in the data directory
    (see `slimflow.evaluation.paths`), else the standard lm-eval task (needs the Hugging Face Hub);
  - `"local"`: always the bundled definition (error if the file is missing);
  - `"hub"`: always the standard lm-eval task.
- Any other name is passed to lm-eval unchanged (it must be a task lm-eval knows).

Results are reported under the standard name (`piqa`), with the lm-eval task actually run, its source, both
`acc` and `acc_norm` where the task has them, and the headline metric of the METHODS §10 rule.
"""

from __future__ import annotations

import difflib
import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from slimflow.evaluation.local_data import LOCAL_TASKS, local_file
from slimflow.errors import InvalidValueError, MissingInputError

TASKS_DIR = Path(__file__).parent / "tasks"
BUNDLED_PREFIX = "slimflow_"
SEVEN = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# METHODS §10: acc for BoolQ/PIQA/WinoGrande/ARC-e, acc_norm for HellaSwag/ARC-c/OBQA
HEADLINE_METRIC = {
    "boolq": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "arc_easy": "acc",
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "lambada_openai": "acc",
}
TASK_SOURCES = ("auto", "local", "hub")


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval logs a notice for every task with a `custom_dataset`; for the bundled tasks it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@dataclass
class TaskChoice:
    name: str  # the name results are reported under (standard name where there is one)
    lm_eval_task: str  # the task lm-eval runs
    source: str  # "local" or "hub"
    data_file: str | None


@functools.lru_cache(maxsize=1)
def all_lm_eval_task_names() -> tuple[str, ...]:
    """Every task, group and tag lm-eval knows (building this index takes ~10 s, so it is cached)."""
    from lm_eval.tasks import TaskManager

    return tuple(TaskManager().all_tasks)


def unknown_task_error(name: str) -> InvalidValueError:
    known = sorted(set(all_lm_eval_task_names()) | set(LOCAL_TASKS) | {BUNDLED_PREFIX + t for t in LOCAL_TASKS})
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return InvalidValueError(
        f"unknown task {name!r}.{hint} Bundled offline tasks: {', '.join(LOCAL_TASKS)} "
        f"(or with the prefix {BUNDLED_PREFIX}); any lm-eval task name works where the Hub is reachable."
    )


def resolve_task(name: str, task_source: str = "auto", data_dir=None) -> TaskChoice:
    if task_source not in TASK_SOURCES:
        raise InvalidValueError(f"task_source must be one of {TASK_SOURCES}, not {task_source!r}")
    name = name.strip()
    bundled = name.removeprefix(BUNDLED_PREFIX)
    if bundled in LOCAL_TASKS:
        path = local_file(bundled, data_dir)
        want_local = name.startswith(BUNDLED_PREFIX) or task_source == "local"
        if want_local or (task_source == "auto" and path is not None):
            if path is None:
                from slimflow.evaluation.paths import searched_locations

                raise MissingInputError(
                    f"local data for task {bundled!r} not found (looked for "
                    f"{searched_locations(LOCAL_TASKS[bundled][0], data_dir)}); pass --data-dir / set SLIMFLOW_DATA "
                    f"to the shared data folder, or run the standard task with --task-source hub"
                )
            return TaskChoice(bundled, BUNDLED_PREFIX + bundled, "local", str(path))
        return TaskChoice(bundled, bundled, "hub", None)
    if name.startswith(BUNDLED_PREFIX) or name not in all_lm_eval_task_names():
        raise unknown_task_error(name)
    return TaskChoice(name, name, "hub", None)


def resolve_tasks(names: list[str], task_source: str = "auto", data_dir=None) -> list[TaskChoice]:
    return [resolve_task(n, task_source, data_dir) for n in names]


def _metric_values(task_results: dict) -> dict:
    """lm-eval's `{"acc,none": x, "acc_stderr,none": s, ...}` -> `{"acc": x, "acc_stderr": s, ...}`."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        out[metric if filt in ("none", "") else f"{metric},{filt}"] = float(value)
    return out


def run_tasks(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 8,
              task_source: str = "auto", data_dir=None, bootstrap_iters: int = 1000) -> dict:
    """Evaluate the in-memory `model` on lm-eval tasks, zero-shot. Returns `{name: {metrics, details}}`."""
    if not names:
        return {}
    choices = resolve_tasks(names, task_source, data_dir)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    needs_defaults = any(c.source == "hub" for c in choices)
    metadata = {"data_dir": str(data_dir)} if data_dir else {}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_defaults, metadata=metadata)
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetNotice) for f in task_logger.filters):
        task_logger.addFilter(_DropCustomDatasetNotice())
    try:
        out = simple_evaluate(
            model=lm, tasks=[c.lm_eval_task for c in choices], num_fewshot=None, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=False,
        )
    finally:
        model.train(was_training)
    results = {}
    for choice in choices:
        raw = out["results"][choice.lm_eval_task]
        metrics = _metric_values(raw)
        headline = HEADLINE_METRIC.get(choice.name)
        if headline not in metrics:
            headline = "acc" if "acc" in metrics else next((m for m in metrics if not m.endswith("_stderr")), None)
        samples = out.get("n-samples", {}).get(choice.lm_eval_task, {})
        results[choice.name] = {
            **asdict(choice),
            "metrics": metrics,
            "metric": headline,
            "value": metrics.get(headline),
            "num_samples": samples.get("effective"),
            "num_documents": samples.get("original"),
            "task_version": out.get("versions", {}).get(choice.lm_eval_task),
        }
    return results


def average_of_seven(task_results: dict) -> dict:
    """Unweighted mean of the headline metrics (METHODS §10 rule) of the seven standard tasks present."""
    used = {t: HEADLINE_METRIC[t] for t in SEVEN if t in task_results and task_results[t].get("value") is not None}
    values = [task_results[t]["value"] for t in used]
    return {
        "value": sum(values) / len(values) if values else None,
        "tasks": list(used),
        "metrics": used,
        "complete": len(used) == len(SEVEN),
        "rule": "acc: boolq, piqa, winogrande, arc_easy; acc_norm: hellaswag, arc_challenge, openbookqa",
    }
