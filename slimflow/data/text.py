"""Reading texts and records from local files or hub datasets: the one place slimflow opens a data file.

Every reader of text in slimflow comes through here: calibration (`slimflow.data.calibration`), the
distillation text and the instruction data of the Lightning DataModules, and the perplexity texts of
`slimflow.evaluation.perplexity` (whose protocol, the `"\\n\\n"`-joined tokenisation, is a step on top of
reading). Whether a source string is a local path or a hub dataset is decided by one rule,
`slimflow.errors.looks_local`.

Local formats, by suffix (each but parquet optionally gzipped, `x.jsonl.gz`):
- `.json`: a JSON array, or JSON lines;
- `.jsonl`: JSON lines;
- `.parquet`: a table (one record per row);
- anything else (`.txt`, `.raw`, ...): plain UTF-8 text, read as one text.
A record is a string or a dict; its text is `field` if given, else the first of `TEXT_FIELDS` it has.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from slimflow.errors import MissingInputError, SlimflowUserError, looks_local

# Short names for common hub corpora: (dataset, config, split, data_files)
HUB_ALIASES = {
    "c4": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    "c4-validation": ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None),
    "wikitext2-test": ("wikitext", "wikitext-2-raw-v1", "test", None),
}
TEXT_FIELDS = ("text", "content", "sentence", "document")


class DataSourceError(SlimflowUserError, ValueError):
    pass


def file_kind(path: str | os.PathLike) -> str:
    """`json`, `jsonl`, `parquet` or `text`, from the suffix under an optional `.gz`."""
    name = Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    for kind in ("jsonl", "json", "parquet"):
        if name.endswith("." + kind):
            return kind
    return "text"


def _local_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"data file not found: {path} (relative paths are resolved from "
                                f"{os.getcwd()}): check the path")
    return path


def _read(path: Path) -> str:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _json_records(content: str) -> list:
    """A JSON array, or JSON lines."""
    if content.lstrip().startswith("["):
        return json.loads(content)
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def read_local_text(path: str | os.PathLike) -> str:
    """The whole content of a local text file (gzipped or not)."""
    return _read(_local_file(path))


def read_local_records(path: str | os.PathLike) -> list:
    """Records of a local `.json` / `.jsonl` (optionally gzipped) or `.parquet` file."""
    path = _local_file(path)
    kind = file_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if kind == "text":
        raise DataSourceError(f"{path} is not a .json, .jsonl or .parquet file of records")
    try:
        return _json_records(_read(path))
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path} is not valid JSON / JSON lines ({err})") from err


def record_text(record, field: str | None = None) -> str:
    """The text of one record: a string, or the `field` (default: the first of `TEXT_FIELDS`) of a dict."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ([field] if field else TEXT_FIELDS):
            if key in record:
                return record[key]
    raise DataSourceError(f"cannot find a text field ({field or ' / '.join(TEXT_FIELDS)}) in record {str(record)[:120]!r}")


def read_local_texts(path: str | os.PathLike, field: str | None = None) -> list[str]:
    """Texts of a local file: one text for plain text, one per record for JSON, JSON lines and parquet."""
    if file_kind(path) == "text":
        return [read_local_text(path)]
    return [record_text(r, field) for r in read_local_records(path)]


def _load_hub_dataset(name: str, split: str | None, config: str | None, data_files=None):
    import datasets

    if name in HUB_ALIASES:
        name, alias_config, alias_split, data_files = HUB_ALIASES[name]
        config, split = config or alias_config, split or alias_split
    try:
        return name, datasets.load_dataset(name, config, split=split or "train", data_files=data_files)
    except Exception as err:  # noqa: BLE001 - surface any hub failure with the fix
        raise DataSourceError(
            f"could not load hub dataset {name!r} ({type(err).__name__}: {err}). Offline, pass a local "
            ".txt/.json/.jsonl(.gz)/.parquet file instead."
        ) from err


def read_hub_texts(name: str, split: str | None = None, field: str | None = None, config: str | None = None,
                   data_files=None) -> list[str]:
    """Texts of a hub dataset (`datasets.load_dataset`), or of an alias in `HUB_ALIASES`."""
    name, ds = _load_hub_dataset(name, split, config, data_files)
    field = field or next((c for c in TEXT_FIELDS if c in ds.column_names), None)
    if field is None or field not in ds.column_names:
        raise DataSourceError(f"dataset {name!r} has no text column {field or ''} among {ds.column_names}; "
                              "pass field=...")
    return list(ds[field])


def read_records(source: str | os.PathLike, split: str | None = None) -> list:
    """Records of a local `.json` / `.jsonl` / `.parquet` file or of a hub dataset split."""
    if looks_local(source):
        return read_local_records(source)
    return list(_load_hub_dataset(os.fspath(source), split, None)[1])


def read_texts(source: str | os.PathLike, split: str | None = None, field: str | None = None) -> list[str]:
    """A local path if it looks like one (`slimflow.errors.looks_local`), otherwise a hub dataset name."""
    if looks_local(source):
        return read_local_texts(source, field)
    return read_hub_texts(os.fspath(source), split=split, field=field)
