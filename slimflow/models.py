"""Loading models, tokenizers and configs by local path or hub id, with errors that say what to change.

`load_model`, `load_tokenizer` and `read_config` are the one loader, tokenizer loader and config reader of
slimflow; a source is a local path or a hub id by `slimflow.errors.looks_local`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from slimflow.errors import InvalidValueError, MissingInputError, SlimflowUserError, looks_local

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


class ModelLoadError(SlimflowUserError, ValueError):
    """A model source that cannot load: not a model directory, an unsupported architecture, a hub failure."""


class ModelNotFoundError(ModelLoadError, MissingInputError):
    """A local-looking model (or tokenizer) path that does not exist."""


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


def read_config(name_or_path: str | os.PathLike) -> dict:
    """The model's config as a dict: `config.json` of a local directory, else the hub model's config.

    The one config reader of slimflow (dtype, context length, model type, pruned widths). A local-looking
    source that is missing or has no config.json is a user error and never goes to the hub.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelLoadError(_no_config(path))
        return json.loads(config.read_text())
    if looks_local(name_or_path):
        raise ModelNotFoundError(_not_found(name_or_path))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.fspath(name_or_path)).to_dict()
    except (OSError, ValueError) as err:
        raise ModelLoadError(_hub_failed(name_or_path, err)) from err


def _not_found(name_or_path) -> str:
    return (f"model directory not found: {os.fspath(name_or_path)}. Check the path (relative paths are resolved "
            "from the current directory).")


def _no_config(path: Path) -> str:
    return (f"{path} is a directory but has no config.json: point --model at a Hugging Face model directory or a "
            "slimflow pruned checkpoint")


def _hub_failed(name, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"could not load {os.fspath(name)!r} as a local directory or a hub model id ({first}). Offline, "
            "download the model first and pass its local directory.")


def source_dtype(name_or_path: str) -> torch.dtype:
    """The dtype the model's weights are stored in (config.json `dtype` / `torch_dtype`; float32 if unrecorded)."""
    data = read_config(name_or_path)
    name = data.get("dtype") or data.get("torch_dtype")
    if isinstance(name, str) and name.startswith("torch."):
        name = name[len("torch."):]
    return DTYPE_NAMES.get(name, torch.float32) if isinstance(name, str) else torch.float32


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a local directory whose config.json records slimflow's per-layer widths."""
    config = Path(path).expanduser() / "config.json"
    return config.is_file() and "slimflow_layer_widths" in read_config(Path(path).expanduser())


def check_model_source(name_or_path: str | os.PathLike, prunable: bool = False) -> None:
    """Fail fast, before any work and without a hub lookup, on a local model source that cannot load.

    A local-looking source (see `slimflow.errors.looks_local`) must be a directory with config.json, a
    model_type transformers can build as a causal LM and complete safetensors files; with `prunable`, its
    model_type must be one slimflow can prune. Hub ids are not checked here (that needs the network).
    """
    from slimflow.checkpoint import check_safetensors, weight_files

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if looks_local(name_or_path):
            raise ModelNotFoundError(_not_found(name_or_path))
        return
    model_type = read_config(path).get("model_type")
    check_architecture(model_type, path)
    for file in weight_files(path):
        if file.is_file():
            check_safetensors(file)
    if prunable:
        from slimflow.adapters import adapter_for_config

        adapter_for_config(type("Config", (), {"model_type": model_type}))


def check_architecture(model_type: str | None, where) -> None:
    """`model_type` must name a causal LM of the installed transformers (slimflow loads no remote code)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type is None:
        raise ModelLoadError(f"{where}/config.json has no model_type: it is not a Hugging Face model directory")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"unsupported architecture in {where}: model_type={model_type!r} is not a causal LM "
                             f"that transformers {transformers.__version__} can build (slimflow runs no remote code)")


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", attn_implementation: str | None = None,
               progress: bool = True):
    """The one model loader of slimflow (CLI, `CausalLMModule` and its teacher, evaluation, GGUF export).

    - a slimflow pruned checkpoint (config.json with `slimflow_layer_widths`): `slimflow.load_pruned`, which
      rebuilds the per-layer widths with stock classes and runs no code from the directory;
    - any other local Hugging Face directory, or a hub id (when the hub is reachable): `from_pretrained`.
    `dtype`: `auto` (float32 on CPU, bfloat16 on CUDA), a name (`bf16`, `float32`, ...) or a `torch.dtype`;
    `device`: `auto`, `cpu`, `cuda:N` or a `torch.device`. A missing path, a directory that is not a model and
    an architecture transformers cannot build are one-line `ModelLoadError`s. The model is returned in eval mode.
    `progress=False` hides transformers' weight-loading bar.
    """
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_model_source(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_pruned_checkpoint(path):
        from slimflow.checkpoint import load_pruned

        return load_pruned(path, dtype=torch_dtype, device=device, attn_implementation=attn_implementation)
    source = path if path.is_dir() else os.fspath(name_or_path)
    try:
        with _loading_bar(progress):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except OSError as err:
        if path.is_dir():
            raise ModelLoadError(f"cannot load the model in {path}: {str(err).strip().splitlines()[0]}") from err
        raise ModelLoadError(_hub_failed(name_or_path, err)) from err
    except ValueError as err:  # e.g. a hub config of an architecture this transformers cannot build
        raise ModelLoadError(f"cannot load {os.fspath(name_or_path)!r} as a causal LM: "
                             f"{str(err).strip().splitlines()[0]}") from err
    return model.to(device).eval()


@contextlib.contextmanager
def _loading_bar(show: bool):
    """transformers' progress bars as asked for while loading, restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show and was else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def load_tokenizer(source, pad_with_eos: bool = True):
    """The one tokenizer loader: a tokenizer object is returned as it is, a path or hub id is loaded with
    `AutoTokenizer` (a local-looking path that does not exist never goes to the hub). `pad_with_eos` gives a
    tokenizer without a pad token the EOS token as pad (the CLI's batched evaluation needs one); the Lightning
    module keeps the tokenizer as shipped, since it is written into the run's export."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if looks_local(source) and not Path(source).expanduser().exists():
        raise ModelNotFoundError(f"tokenizer directory not found: {os.fspath(source)}. Check the path (relative "
                                 "paths are resolved from the current directory).")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(Path(source).expanduser()) if looks_local(source)
                                                  else os.fspath(source))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load a tokenizer from {os.fspath(source)!r}: {first}") from err
    if pad_with_eos and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
