"""Load a model to evaluate: a slimflow pruned directory, any local HF directory, or a Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (the reference perplexities are fp32 CPU) and bfloat16 on a GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def is_pruned_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return "slimflow_layer_widths" in json.loads(config.read_text())


def load_model_and_tokenizer(model: str, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) in eval mode on `device`. Pruned directories go through `slimflow.checkpoint.load_pruned`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} exists but has no config.json; give a model directory or a Hub id")
    if path.is_dir() and is_pruned_dir(path):
        from slimflow.checkpoint import load_pruned

        loaded = load_pruned(str(path), dtype=torch_dtype, device=target)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else model, dtype=torch_dtype)
        loaded.to(target)
    tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else model)
    loaded.eval()
    return loaded, tokenizer
