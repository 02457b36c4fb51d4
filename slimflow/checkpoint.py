"""The pruned-checkpoint format: a Hugging Face model directory whose layers have their own widths.

A checkpoint holds `model.safetensors`, `config.json` (the dense global sizes plus `slimflow_layer_widths`
and `per_layer_config`), `pruning.json`, `modeling_slimflow.py` with `auto_map` for
`from_pretrained(trust_remote_code=True)`, `generation_config.json` and the tokenizer when given.
`load_pruned` rebuilds the model with stock transformers classes and never runs code from the directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import slimflow
from slimflow.adapters import get_adapter
from slimflow.errors import MissingInputError, OutputExistsError, SlimflowUserError
from slimflow.models import read_config
from slimflow.surgery import LayerWidths, apply_widths, count_parameters, layer_widths

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PRUNING_NAME = "pruning.json"
MODELING_NAME = "modeling_slimflow.py"
WIDTHS_KEY = "slimflow_layer_widths"

_TEMPLATE = Path(__file__).parent / "templates" / MODELING_NAME
SLICING_KEY = "slimflow_slicing"
_GLOBAL_SIZES = (
    "num_hidden_layers",
    "hidden_size",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class NotASlimflowCheckpointError(SlimflowUserError, ValueError):
    pass


class CorruptWeightsError(SlimflowUserError, ValueError):
    pass


def check_safetensors(file: Path) -> None:
    """Read the header of a safetensors `file` (cheap): a truncated or foreign file fails with its name."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except SafetensorError as err:
        raise CorruptWeightsError(f"{file} is not a complete safetensors file ({err}): it is probably truncated "
                                  "(an interrupted download or copy); copy or export it again") from err


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded with an index)."""
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------------- save


def save_pruned(model: nn.Module, path, tokenizer=None, report=None, overwrite: bool = False,
                extras: Callable[[Path], None] | None = None) -> Path:
    """Write `model` (pruned or dense) as a checkpoint directory at `path` and return the path.

    Everything is written to a temporary sibling first and renamed into place at the end, so a failure never
    leaves a half-written checkpoint and an existing one is replaced only once the new one is complete.
    `extras(directory)` may add further files (reports, plots) to the staging directory before the rename.
    """
    with staged_directory(model, path, overwrite) as staging:
        tensors, tied = _weights_for_saving(model)
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        write_metadata(model, staging, tokenizer, report, tied, dtype=next(iter(tensors.values())).dtype)
        if extras is not None:
            extras(staging)
    return Path(path)


@contextlib.contextmanager
def staged_directory(model: nn.Module, path, overwrite: bool = False):
    """A temporary sibling of `path` to write a checkpoint into; renamed to `path` when the block succeeds,
    removed when it fails."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    get_adapter(model)  # raises the "unsupported model type" error before anything is written
    with staged_output(path) as staging:
        yield staging


@contextlib.contextmanager
def staged_output(path: Path):
    """Write into a hidden sibling of `path` and rename it to `path` at the end (replacing an old `path`);
    the sibling is removed when the block fails, so no partial output ever carries the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_metadata(model: nn.Module, directory: Path, tokenizer, report, tied: bool, dtype: torch.dtype) -> None:
    """Everything of a checkpoint but the weights: config.json (widths read from `model`'s shapes, so a model
    whose layers live on the meta device works), the modeling file, generation config, tokenizer, pruning.json."""
    widths = layer_widths(model)
    _write_json(directory / CONFIG_NAME, _config_dict(model, widths, tied, dtype=dtype))
    (directory / MODELING_NAME).write_text(modeling_file(get_adapter(model)))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    _write_json(directory / PRUNING_NAME, _pruning_record(model, widths, report))


def modeling_file(adapter) -> str:
    """The bundled modeling file: the generic width-cutting code plus the family's class on its stock class."""
    return _TEMPLATE.read_text() + (
        f"\n\nfrom transformers import {adapter.stock_class}  # noqa: E402\n\n\n"
        f"class {adapter.remote_class}(_PerLayerWidths, {adapter.stock_class}):\n    pass\n"
    )


def replace_directory(staging: Path, path: Path) -> None:
    """Move the finished `staging` directory to `path`, keeping any old `path` until the move has succeeded."""
    if not path.exists():
        staging.rename(path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    path.rename(old)
    try:
        staging.rename(path)
    except BaseException:
        old.rename(path)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _weights_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict as contiguous CPU tensors, each shared tensor once (safetensors refuses aliases).

    The first name of a shared tensor is kept, so tied output embeddings are stored as the input embedding only.
    """
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, _embeddings_tied(model)


def _embeddings_tied(model: nn.Module) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and outputs.weight is inputs.weight


def _dense_config(config):
    """A copy of `config` without per-layer overrides, so its global (dense) sizes can be read and serialised."""
    config = copy.deepcopy(config)
    if getattr(config, "is_heterogeneous", False):
        config.per_layer_config = None
    return config


def _config_dict(model: nn.Module, widths: list[LayerWidths], tied: bool, dtype: torch.dtype) -> dict:
    config = _dense_config(model.config)
    config.dtype = dtype
    data = json.loads(config.to_json_string(use_diff=True))
    data.pop("per_layer_config", None)
    # Global sizes stay those of the dense skeleton both reload paths cut the layers from (transformers validates
    # them, e.g. hidden_size % num_attention_heads); per-layer values live in `slimflow_layer_widths`.
    for key in _GLOBAL_SIZES:
        data[key] = getattr(config, key)
    data["tie_word_embeddings"] = tied
    adapter = get_adapter(model)
    data["architectures"] = [adapter.remote_class]
    data["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_NAME[:-3]}.{adapter.remote_class}"}
    data[WIDTHS_KEY] = [w.to_dict() for w in widths]
    data[SLICING_KEY] = adapter.slicing_spec()
    data["per_layer_config"] = _per_layer_config(widths)
    data["slimflow_version"] = slimflow.__version__
    return data


def _per_layer_config(widths: list[LayerWidths]) -> dict:
    # Query heads stay out: the pinned LlamaConfig validation reads a global head count and rejects a per-layer
    # one. They follow from the KV heads, since pruning keeps the query heads per KV head fixed.
    return {
        str(i): {"num_key_value_heads": w.num_key_value_heads, "intermediate_size": w.intermediate_size}
        for i, w in enumerate(widths)
    }


def _dense_parameter_count(config) -> int:
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(_dense_config(config))
    return count_parameters(dense)


def _pruning_record(model: nn.Module, widths: list[LayerWidths], report) -> dict:
    if report is None:
        record = {}
    elif hasattr(report, "to_dict"):
        record = dict(report.to_dict())
    else:
        record = dict(report)
    if record.get("params_before") is None:
        record["params_before"] = _dense_parameter_count(model.config)
    record["params_after"] = count_parameters(model)
    record["layer_widths"] = [w.to_dict() for w in widths]
    record.setdefault("model_type", model.config.model_type)
    record.setdefault("slimflow_version", slimflow.__version__)
    return record


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------- load


def load_pruned(path, dtype: torch.dtype | None = None, device=None, attn_implementation: str | None = None):
    """Rebuild a checkpoint written by `save_pruned` (or a dense HF safetensors directory) and load its weights.

    The model is built from config.json with the stock transformers classes on the meta device, shrunk to the
    recorded widths, then filled from the safetensors file with `strict=True`. No code from `path` is executed.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"no checkpoint directory at {path}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise NotASlimflowCheckpointError(f"{path} has no {CONFIG_NAME}; it is not a model directory")
    data = read_config(path)
    widths = [LayerWidths(**w) for w in data.get(WIDTHS_KEY) or []]
    config = _stock_config(data, attn_implementation)
    tensors = _read_weights(path, device)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if widths:
        apply_widths(model, widths)
    _fill_tied_names(model, tensors)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        raise NotASlimflowCheckpointError(
            f"the weights in {path} do not match the layer widths recorded in its {CONFIG_NAME}: {error}"
        ) from error
    if config.tie_word_embeddings:
        model.tie_weights()
    _rebuild_meta_buffers(model, device)

    model.config.dtype = next(model.parameters()).dtype
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _stock_config(data: dict, attn_implementation: str | None):
    """The stock transformers config of `data`, without the fields only the bundled modeling file reads."""
    data = {k: v for k, v in data.items() if k not in ("auto_map", "per_layer_config", "architectures", SLICING_KEY)}
    model_type = data.get("model_type")
    if model_type is None:
        raise NotASlimflowCheckpointError("config.json has no model_type")
    config = AutoConfig.for_model(**data)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def _read_weights(path: Path, device) -> dict[str, torch.Tensor]:
    files = weight_files(path)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingInputError(f"{path} lists weight files that are missing: {', '.join(missing)}")
    if not files:
        pickles = [name for name in _PICKLE_NAMES if (path / name).exists()]
        hint = f" (found {pickles[0]}: slimflow reads safetensors only)" if pickles else ""
        raise MissingInputError(f"{path} has no {WEIGHTS_NAME}{hint}")
    tensors = {}
    for file in files:
        check_safetensors(file)
        with safe_open(str(file), framework="pt", device=str(device or "cpu")) as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def _fill_tied_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give every name of a shared parameter (tied embeddings) the tensor stored under one of its names."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    for names in names_by_tensor.values():
        stored = [n for n in names if n in tensors]
        for name in names:
            if stored and name not in tensors:
                tensors[name] = tensors[stored[0]]


def _rebuild_meta_buffers(model: nn.Module, device) -> None:
    """Recompute non-persistent buffers (rotary frequencies) that the meta-device build left empty."""
    for name, module in model.named_modules():
        if not any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            continue
        if hasattr(module, "scalar_embed_scale"):  # Gemma's scaled embeddings keep their scale as a buffer
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device or "cpu")
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise RuntimeError(f"cannot rebuild the buffers of {name} ({type(module).__name__}) after a meta build")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with torch.device(device or "cpu"):
            setattr(parent, attr, type(module)(config=module.config))
