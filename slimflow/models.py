"""Loading a model by local path or hub id, with errors that say what to change."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimflow.errors import InvalidValueError, SlimflowUserError, looks_local

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


class ModelLoadError(SlimflowUserError, ValueError):
    pass


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPE_NAMES:
        raise InvalidValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto`: CUDA if present, else CPU. A device this torch build or machine lacks is a user error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"device {device!r} asked for, but this torch build or machine has no CUDA "
                                    "device: use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidValueError(f"device {device!r} does not exist: this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "meta"):
        raise InvalidValueError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def source_dtype(name_or_path: str) -> torch.dtype:
    """The dtype the model's weights are stored in (config.json `dtype` / `torch_dtype`; float32 if unrecorded)."""
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
    else:
        from transformers import AutoConfig

        data = AutoConfig.from_pretrained(name_or_path).to_dict()
    name = data.get("dtype") or data.get("torch_dtype")
    if isinstance(name, str) and name.startswith("torch."):
        name = name[len("torch."):]
    return DTYPE_NAMES.get(name, torch.float32) if isinstance(name, str) else torch.float32


def is_pruned_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "slimflow_layer_widths" in json.loads(config.read_text())


def check_model_source(name_or_path: str, prunable: bool = False) -> None:
    """Fail fast, before any work and without a hub lookup, on a local model source that cannot load.

    A local-looking source (see `slimflow.errors.looks_local`) must be a directory with config.json and
    complete safetensors files; with `prunable`, its model_type must be one slimflow can prune.
    Hub ids are not checked here (that needs the network).
    """
    from slimflow.checkpoint import check_safetensors, weight_files

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if looks_local(name_or_path):
            raise ModelLoadError(f"model directory not found: {name_or_path}. Check the path (relative paths are "
                                 "resolved from the current directory).")
        return
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is a directory but has no config.json: point --model at a Hugging Face "
                             "model directory or a slimflow pruned checkpoint")
    for file in weight_files(path):
        if file.is_file():
            check_safetensors(file)
    if prunable:
        from slimflow.adapters import adapter_for_config

        model_type = json.loads(config.read_text()).get("model_type")
        adapter_for_config(type("Config", (), {"model_type": model_type}))


def load_model(name_or_path: str, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = "auto",
               attn_implementation: str | None = None):
    """A slimflow pruned directory (rebuilt without running code from it), a plain HF directory, or a hub id.

    The one model loader of the CLI, the Lightning module, evaluation and the export."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = Path(name_or_path).expanduser()
    check_model_source(name_or_path)
    if path.is_dir():
        if is_pruned_checkpoint(path):
            from slimflow.checkpoint import load_pruned

            return load_pruned(path, dtype=torch_dtype, device=device, attn_implementation=attn_implementation)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra).to(device)
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
