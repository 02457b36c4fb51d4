"""`slimflow export`: write a pruned (or dense) model in a serving format."""

from __future__ import annotations

import json
from typing import Literal


def export(*, model: str, output: str, format: Literal["gguf"] = "gguf",
           dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16", overwrite: bool = False) -> dict:
    """Export a slimflow checkpoint (or a dense Hugging Face model directory) for a serving runtime.

    GGUF files run in llama.cpp and everything built on it (llama-server, Ollama, LM Studio) through its
    heterogeneous `deci` architecture, per-layer head and FFN widths included (see docs/serving.md).

    Args:
        model: slimflow pruned checkpoint directory, or a dense Hugging Face model directory.
        output: file to write (FILE.gguf); written under a temporary name and renamed when complete.
        format: export format; gguf.
        dtype: GGUF weight type: f32, f16, bf16 or q8_0 (norms and biases stay f32).
        overwrite: replace an existing output file.
    """
    from slimflow.export.gguf import GGUFExportError, export_gguf

    if format != "gguf":
        raise GGUFExportError(f"unknown export --format {format!r}; supported: gguf")
    summary = export_gguf(model, output, dtype=dtype, overwrite=overwrite)
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    if summary["f16_fallback"]:
        print(f"note: {len(summary['f16_fallback'])} tensors have rows that are not a multiple of 32 and were "
              "written as f16 instead of q8_0")
    print(json.dumps({k: summary[k] for k in ("path", "dtype", "bytes", "architecture", "tokenizer")}))
    return summary
