"""Exports of a slimflow model to serving formats (no Lightning import)."""

from __future__ import annotations

_LAZY = {name: "slimflow.export.gguf" for name in ("DTYPES", "GGUFExportError", "export_gguf", "write_gguf")}


def __getattr__(name: str):
    # Lazy so that `slimflow export --help` does not import torch and gguf.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimflow.export' has no attribute {name!r}")


__all__ = list(_LAZY)
