"""`custom_dataset` hooks of the bundled task YAMLs: each returns the local data as a `DatasetDict`.

lm-eval calls them with the task metadata as keyword arguments; `data_dir` comes from the metadata slimflow
passes to `TaskManager` (None means the default resolution of `slimflow.evaluation.paths`).
"""

from slimflow.evaluation.local_data import load_local_task


def boolq(data_dir=None, **_):
    return load_local_task("boolq", data_dir)


def piqa(data_dir=None, **_):
    return load_local_task("piqa", data_dir)


def hellaswag(data_dir=None, **_):
    return load_local_task("hellaswag", data_dir)


def winogrande(data_dir=None, **_):
    return load_local_task("winogrande", data_dir)


def arc_easy(data_dir=None, **_):
    return load_local_task("arc_easy", data_dir)


def arc_challenge(data_dir=None, **_):
    return load_local_task("arc_challenge", data_dir)


def openbookqa(data_dir=None, **_):
    return load_local_task("openbookqa", data_dir)


def lambada_openai(data_dir=None, **_):
    return load_local_task("lambada_openai", data_dir)
