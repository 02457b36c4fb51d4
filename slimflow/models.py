"""Loading a model by local path or hub id, with errors that say what to change."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    pass


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_pruned_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "slimflow_layer_widths" in json.loads(config.read_text())


def load_model(name_or_path: str, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = "auto",
               attn_implementation: str | None = None):
    """A slimflow pruned directory (rebuilt without running code from it), a plain HF directory, or a hub id.

    The one model loader of the CLI, the Lightning module, evaluation and the export."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = Path(name_or_path)
    if path.is_dir():
        if is_pruned_checkpoint(path):
            from slimflow.checkpoint import load_pruned

            return load_pruned(path, dtype=torch_dtype, device=device, attn_implementation=attn_implementation)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but has no config.json: point --model at a Hugging Face "
                                 "model directory or a slimflow pruned checkpoint")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra).to(device)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise ModelLoadError(f"model directory not found: {name_or_path}. Check the path (relative paths are "
                             "resolved from the current directory).")
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **extra).to(device)
    except OSError as err:
        raise ModelLoadError(f"could not load {name_or_path!r} as a local directory or a hub model id ({err}). "
                             "Offline, download the model first and pass its local directory.") from err


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
