"""Local copies of the zero-shot data sets, converted to the schema of the Hub data sets lm-eval uses.

Each `*_records(path)` reads one file from the shared data directory and returns records with the same fields
as the Hub data set of the standard lm-eval task (`baber/piqa`, `aps/super_glue` boolq, `allenai/ai2_arc`,
`allenai/openbookqa`, `allenai/winogrande`, `EleutherAI/lambada_openai`), so the bundled task YAMLs can use the
standard prompt templates unchanged. HellaSwag is the exception: the local file only has the already cleaned
context, so its records are in the shape lm-eval's `process_docs` produces (`query`, `choices`, `gold`).
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from slimflow.data.text import read_local_records, read_local_text
from slimflow.evaluation.paths import find_data_file, searched_locations
from slimflow.errors import InvalidValueError, MissingInputError

# bundled task -> (standard lm-eval task, file inside the data directory, split name)
LOCAL_TASKS = {
    "boolq": ("boolq/boolq_validation.jsonl", "validation"),
    "piqa": ("piqa/valid.jsonl", "validation"),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", "validation"),
    "winogrande": ("winogrande/winogrande_xl_dev.jsonl", "validation"),
    "arc_easy": ("arc/arc_easy_test.jsonl", "test"),
    "arc_challenge": ("arc/arc_challenge_test.jsonl", "test"),
    "openbookqa": ("openbookqa/openbookqa_test.jsonl", "test"),
    "lambada_openai": ("lambada_openai/lambada_openai_test.jsonl", "test"),
}
LETTERS = "ABCDEFGHIJ"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return read_local_records(path)


def boolq_records(path) -> list[dict]:
    """`{"query": "Passage: P\\nQuestion: Q?", "choices": ["no","yes"], "gold"}` -> `{passage, question, label}`."""
    out = []
    for r in read_jsonl(path):
        passage, question = r["query"].rsplit("\nQuestion: ", 1)
        passage = passage.removeprefix("Passage: ")
        out.append({"passage": passage, "question": question.removesuffix("?"), "label": int(r["gold"])})
    return out


def piqa_records(path) -> list[dict]:
    """`valid.jsonl` + the aligned `valid-labels.lst` -> `{goal, sol1, sol2, label}` (the Hub schema already)."""
    labels_path = Path(path).with_name("valid-labels.lst")
    if not labels_path.is_file():
        raise MissingInputError(f"PIQA labels file {labels_path} is missing (it must sit next to {path})")
    labels = [int(line) for line in read_local_text(labels_path).split()]
    records = read_jsonl(path)
    if len(labels) != len(records):
        raise InvalidValueError(f"{path} has {len(records)} records but {labels_path} has {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in zip(records, labels)]


def arc_records(path) -> list[dict]:
    """`{"query": "Question: Q", "choices", "gold"}` -> `{question, choices: {text, label}, answerKey}`."""
    out = []
    for i, r in enumerate(read_jsonl(path)):
        labels = list(LETTERS[: len(r["choices"])])
        out.append(
            {
                "id": str(i),
                "question": r["query"].removeprefix("Question: "),
                "choices": {"text": list(r["choices"]), "label": labels},
                "answerKey": labels[int(r["gold"])],
            }
        )
    return out


def openbookqa_records(path) -> list[dict]:
    """`{"query": stem, "choices", "gold"}` -> `{question_stem, choices: {text, label}, answerKey}`."""
    out = []
    for i, r in enumerate(read_jsonl(path)):
        labels = list(LETTERS[: len(r["choices"])])
        out.append(
            {
                "id": str(i),
                "question_stem": r["query"],
                "choices": {"text": list(r["choices"]), "label": labels},
                "answerKey": labels[int(r["gold"])],
            }
        )
    return out


def _split_options(context_options: list[str]) -> tuple[str, list[str]]:
    """The shared sentence start and the two option texts; the split is moved back to a word boundary."""
    a, b = context_options
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    n = a.rfind(" ", 0, n) + 1 if " " in a[:n] else 0
    return a[:n], [a[n:], b[n:]]


def winogrande_records(path) -> list[dict]:
    """Partial-scoring records -> `{sentence, option1, option2, answer}` with `_` at the blank.

    lm-eval builds the contexts as `sentence[:blank] + option` and the target as `sentence[blank+1:].strip()`,
    so the rebuilt sentence `prefix + "_ " + continuation` gives exactly the local contexts and continuation.
    """
    out = []
    for r in read_jsonl(path):
        prefix, options = _split_options(r["context_options"])
        out.append(
            {
                "sentence": f"{prefix}_ {r['continuation']}",
                "option1": options[0],
                "option2": options[1],
                "answer": str(int(r["gold"]) + 1),
            }
        )
    return out


def hellaswag_records(path) -> list[dict]:
    """`{"ind", "query", "endings", "label"}` -> lm-eval's processed form `{query, choices, gold, label}`.

    lm-eval's own `preprocess` (from its hellaswag utils) is applied to the context and each ending; the local
    context is the raw `ctx` field, so unlike lm-eval the part after `ctx_a` (`ctx_b`) is not capitalised.
    """
    from lm_eval.tasks.hellaswag.utils import preprocess

    out = []
    for r in read_jsonl(path):
        out.append(
            {
                "ind": int(r["ind"]),
                "query": preprocess(r["query"]),
                "choices": [preprocess(e) for e in r["endings"]],
                "gold": int(r["label"]),
                "label": str(r["label"]),
            }
        )
    return out


def lambada_records(path) -> list[dict]:
    """`{"context", "continuation"}` -> `{text}` with `text = context + " " + continuation` (lm-eval splits it back)."""
    return [{"text": f"{r['context']} {r['continuation']}"} for r in read_jsonl(path)]


CONVERTERS = {
    "boolq": boolq_records,
    "piqa": piqa_records,
    "hellaswag": hellaswag_records,
    "winogrande": winogrande_records,
    "arc_easy": arc_records,
    "arc_challenge": arc_records,
    "openbookqa": openbookqa_records,
    "lambada_openai": lambada_records,
}


def local_file(task: str, data_dir=None) -> Path | None:
    return find_data_file(LOCAL_TASKS[task][0], data_dir)


def load_local_task(task: str, data_dir=None) -> datasets.DatasetDict:
    """The local data of a bundled task as a `DatasetDict` with the split its YAML reads."""
    relative, split = LOCAL_TASKS[task]
    path = find_data_file(relative, data_dir)
    if path is None:
        raise MissingInputError(
            f"local data for task {task!r} not found; looked for {searched_locations(relative, data_dir)}. "
            f"Pass --data-dir (or set SLIMFLOW_DATA) to the folder holding {relative}, or use the hub task."
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(CONVERTERS[task](path))})
