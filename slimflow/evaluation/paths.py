"""Where shared data lives: an explicit path, then `$SLIMFLOW_DATA`, then `../shared/data` next to the repo.

Resolution order: the first of these that is given decides, with no fallback past it:
1. the `data_dir` argument (`--data-dir` on the command line);
2. the environment variable `SLIMFLOW_DATA`;
3. otherwise `<repo root>/../shared/data` (the repo root is the directory holding the `slimflow` package),
   then `../shared/data` relative to the current working directory (first one that exists).
"""

from __future__ import annotations

import os
from pathlib import Path
from slimflow.errors import MissingInputError

DATA_ENV = "SLIMFLOW_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    if data_dir:
        return [Path(data_dir).expanduser()]
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).expanduser()]
    return [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first existing data directory, or None. An explicit `data_dir` that does not exist is an error."""
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise MissingInputError(f"data directory {data_dir} does not exist; fix --data-dir or unset it")
    for path in candidate_data_dirs(data_dir):
        if path.is_dir():
            return path.resolve()
    return None


def find_data_file(relative: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """`relative` (e.g. `piqa/valid.jsonl`) inside the first data directory that has it, or None."""
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise MissingInputError(f"data directory {data_dir} does not exist; fix --data-dir or unset it")
    for base in candidate_data_dirs(data_dir):
        if (base / relative).is_file():
            return (base / relative).resolve()
    return None


def searched_locations(relative: str, data_dir: str | os.PathLike | None = None) -> str:
    return ", ".join(str(base / relative) for base in candidate_data_dirs(data_dir))
