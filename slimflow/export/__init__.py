"""Exports of a slimflow model to serving formats (no Lightning import)."""

from slimflow.export.gguf import DTYPES, GGUFExportError, export_gguf, write_gguf

__all__ = ["DTYPES", "GGUFExportError", "export_gguf", "write_gguf"]
