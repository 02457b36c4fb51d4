"""Reading text from local files or hub datasets: the one place slimflow turns a source string into texts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from slimflow.errors import SlimflowUserError, looks_local

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


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _record_text(record, field: str | None) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ([field] if field else TEXT_FIELDS):
            if key in record:
                return record[key]
    raise DataSourceError(f"cannot find a text field ({field or ' / '.join(TEXT_FIELDS)}) in record {str(record)[:120]!r}")


def read_local_texts(path: str | Path, field: str | None = None) -> list[str]:
    """Texts of a local .txt / .json / .jsonl file, optionally gzipped (`.txt.gz`, `.jsonl.gz`, ...)."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"text file not found: {path} (relative paths are resolved from the current "
                              "directory): check the path")
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    with _open(path) as f:
        if stem.endswith(".jsonl"):
            return [_record_text(json.loads(line), field) for line in f if line.strip()]
        if stem.endswith(".json"):
            head = f.read(1)
            f.seek(0)
            if head == "[":
                return [_record_text(r, field) for r in json.load(f)]
            return [_record_text(json.loads(line), field) for line in f if line.strip()]
        return [f.read()]


def read_hub_texts(name: str, split: str | None = None, field: str | None = None, config: str | None = None) -> list[str]:
    """Texts of a hub dataset (`datasets.load_dataset`), or of an alias in `HUB_ALIASES`."""
    import datasets

    data_files = None
    if name in HUB_ALIASES:
        name, alias_config, alias_split, data_files = HUB_ALIASES[name]
        config, split = config or alias_config, split or alias_split
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", data_files=data_files)
    except Exception as err:  # noqa: BLE001 - surface any hub failure with the fix
        raise DataSourceError(
            f"could not load hub dataset {name!r} ({type(err).__name__}: {err}). Offline, pass a local "
            ".txt/.json/.jsonl(.gz) file instead."
        ) from err
    field = field or next((c for c in TEXT_FIELDS if c in ds.column_names), None)
    if field is None:
        raise DataSourceError(f"dataset {name!r} has no text column among {ds.column_names}; pass field=...")
    return list(ds[field])


def read_texts(source: str | Path, split: str | None = None, field: str | None = None) -> list[str]:
    """A local path if it looks like one (`slimflow.errors.looks_local`), otherwise a hub dataset name."""
    if looks_local(source):
        return read_local_texts(Path(source).expanduser(), field)
    return read_hub_texts(str(source), split=split, field=field)
