"""User errors: problems with what was asked for (a value, a path, a model), as opposed to defects in slimflow.

Every user error derives from `SlimflowUserError`; the `slimflow` command prints such an error as one line
`error: ...` (the message names the fix) and exits with status 2, while any other exception keeps its
traceback. The concrete classes also derive from the built-in exception a Python caller would expect
(`ValueError`, `FileNotFoundError`, `FileExistsError`), so `except ValueError` keeps working.

Local paths and hub ids share one rule, `looks_local`: whatever looks like a path is never looked up on the hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEBUG_ENV = "SLIMFLOW_DEBUG"

# suffixes of local data and weight files: `wiki.txt` is a file, never a hub id
LOCAL_SUFFIXES = frozenset({".txt", ".gz", ".json", ".jsonl", ".raw", ".parquet", ".safetensors", ".yaml", ".yml", ".ckpt"})


class SlimflowUserError(Exception):
    """Base of every error caused by the user's input; the message says what to change."""


class InvalidValueError(SlimflowUserError, ValueError):
    """An option has a value slimflow cannot use (out of range, unknown name, impossible combination)."""


class MissingInputError(SlimflowUserError, FileNotFoundError):
    """A file or directory the user named does not exist (or lacks a required file)."""


class OutputExistsError(SlimflowUserError, FileExistsError):
    """The output already exists and may not be replaced."""


class InsufficientMemoryError(SlimflowUserError, MemoryError):
    """The device cannot hold what was asked for (checked before any work: `slimflow.device_memory`)."""


def looks_local(source: str | os.PathLike) -> bool:
    """Whether `source` names a local file or directory rather than a hub id (`org/name`, `c4`).

    Local: anything that exists; anything starting with `.`, `/` or `~`; a deeper path (`a/b/c`: hub ids have
    exactly one `/`) or a Windows-style one; `dir/name` where `dir` is a local directory; a name with a data or
    weights suffix (`text.txt.gz`).
    """
    text = os.fspath(source)
    return (
        os.path.exists(os.path.expanduser(text))
        or text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or (text.count("/") == 1 and os.path.isdir(text.split("/")[0]))
        or Path(text).suffix.lower() in LOCAL_SUFFIXES
    )


def require_existing(source: str | os.PathLike | None, what: str) -> None:
    """Fail now, before anything expensive, if `source` looks local but does not exist."""
    if source and looks_local(source) and not os.path.exists(os.path.expanduser(os.fspath(source))):
        raise MissingInputError(f"{what} {os.fspath(source)!r} does not exist (relative paths are resolved from "
                                f"{os.getcwd()}): check the path")


# other libraries' classes for configuration mistakes (matched by name: slimflow.errors imports none of them)
FOREIGN_USER_ERRORS = frozenset({"lightning.fabric.utilities.exceptions.MisconfigurationException"})


def _chain(error: BaseException | None):
    """`error` and the errors it was raised from (`__cause__`, else `__context__`), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def user_error_in(error: BaseException) -> BaseException | None:
    """The user error (`SlimflowUserError`, or a library's configuration error in `FOREIGN_USER_ERRORS`) that
    `error` is or was raised from (frameworks wrap the errors of the classes they build)."""
    return next((e for e in _chain(error) if isinstance(e, SlimflowUserError) or any(
        f"{cls.__module__}.{cls.__qualname__}" in FOREIGN_USER_ERRORS for cls in type(e).__mro__)), None)


# What cuBLAS / cuSOLVER report when they cannot allocate their workspace on a full card: torch raises a plain
# RuntimeError for these, not an OutOfMemoryError (seen with twenty processes sharing one 80 GiB card).
_HANDLE_FAILURE = re.compile(r"(CUSOLVER|CUBLAS)_STATUS_(ALLOC_FAILED|INTERNAL_ERROR|NOT_INITIALIZED)"
                             r"(?:,? when calling `(\w+)\(handle\)`)?")


def out_of_memory_in(error: BaseException) -> str | None:
    """A one-line message for a CUDA out-of-memory error that `error` is or was raised from (None otherwise):
    what torch tried to allocate and what was free, and what to lower. Matched by class name, without importing
    torch. A cuBLAS / cuSOLVER failure to allocate or create its handle counts too: on a working setup that
    comes from a card whose memory is full."""
    chain = list(_chain(error))
    oom = next((e for e in chain if any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)), None)
    fixes = ("lower the batch size (--batch-size) or the sequence length, set --generated-samples 0, or use a "
             "device with more memory; --debug shows the traceback")
    if oom is None:
        handle = next((m for e in chain if isinstance(e, RuntimeError) and (m := _HANDLE_FAILURE.search(str(e)))),
                      None)
        if handle is None or (handle[2] != "ALLOC_FAILED" and not handle[3]):
            return None
        where = f" in {handle[3]}" if handle[3] else ""
        return (f"out of memory on the GPU ({handle[1]}_STATUS_{handle[2]}{where}: {handle[1].lower()} could not "
                f"set up on the card, usually because its memory is full): other processes may hold the card "
                f"(nvidia-smi lists them), or {fixes}")
    text = str(oom)
    tried = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    free = re.search(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free", text)
    detail = "; ".join(filter(None, [tried and f"tried to allocate {tried[1]}",
                                     free and f"{free[2]} of {free[1]} free"])) or text.split("\n")[0][:120]
    return f"out of memory on the GPU ({detail}): {fixes}"
