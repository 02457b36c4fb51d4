"""Streaming pruning: models larger than host memory, one decoder layer in memory at a time.

The model is built on the meta device from config.json; only the embeddings, the final norm and the head are
read from the checkpoint up front. Each decoder layer is read from the safetensors shards when its turn comes,
pruned on the device, cast to the save dtype and written to its own shard of the output checkpoint, and put
back on the meta device before the next one is read. Peak host memory is about two layers plus the embeddings
and head (plus the calibration activations when the device is the CPU). The arithmetic is the in-memory path's
(`slimflow.prune` then `save_pruned`) on the same tensors, so the weights are identical; the output is the
same checkpoint format, with the weights sharded per layer (`model.safetensors.index.json`, which
`load_pruned` and `from_pretrained` read).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimflow.adapters import get_adapter
from slimflow.checkpoint import (
    WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WIDTHS_KEY, _embeddings_tied, _rebuild_meta_buffers,
    _stock_config, staged_directory, write_metadata,
)
from slimflow.errors import SlimflowUserError
from slimflow.methods.base import PruningMethod


class StreamingError(ValueError):
    pass


class NotStreamableError(SlimflowUserError, StreamingError):
    """The model or method cannot be streamed (a user choice to change, e.g. --streaming false)."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards its index names)."""
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    raise NotStreamableError(f"{path} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}: streaming reads safetensors "
                         "checkpoints only (use --streaming false for other formats)")


def checkpoint_bytes(path) -> int:
    """Size of a model directory's safetensors weights on disk."""
    return sum(f.stat().st_size for f in checkpoint_files(Path(path)))


def available_memory() -> int:
    """Host memory available to this process now (MemAvailable), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def should_stream(path, dtype: torch.dtype, memory: int | None = None) -> bool:
    """Automatic choice: stream when the weights at `dtype` would take more than half the available memory."""
    path = Path(path)
    if not path.is_dir():
        return False  # hub ids load in memory
    try:
        stored = checkpoint_bytes(path)
    except StreamingError:
        return False
    stored_itemsize = _stored_itemsize(path)
    need = stored * dtype.itemsize // stored_itemsize
    return need > (memory if memory is not None else available_memory()) // 2


def _stored_itemsize(path: Path) -> int:
    from slimflow.models import source_dtype

    return source_dtype(path).itemsize


def check_streamable(pruner: PruningMethod) -> None:
    """Streaming needs a method that decides layer by layer from that layer alone (`PruningMethod.streamable`)."""
    if not pruner.streamable():
        raise NotStreamableError(f"method {pruner.name!r} needs the whole model in memory (global statistics, "
                             "gradients or added biases); stream with slimgpt, magnitude or wanda-sp, or pass "
                             "--streaming false")


def _return_freed_memory() -> None:
    """Hand the heap pages freed by the last layer back to the OS (glibc keeps them otherwise, and the next
    layer's differently sized buffers would not reuse them all, so RSS would creep towards the model size)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _Shards:
    """Tensor names → safetensors file of a checkpoint; each read opens and closes the file, so no mapping (and
    no resident page of it) outlives the read."""

    def __init__(self, path: Path):
        self.file_of: dict[str, Path] = {}
        for file in checkpoint_files(path):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    self.file_of[name] = file

    def read(self, names: list[str], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise StreamingError(f"the checkpoint has no tensor {missing[0]!r} (its config.json and weights differ)")
        out: dict[str, torch.Tensor] = {}
        for name in names:
            # one open per tensor: the file's mapping (and its resident pages) lives only while it is copied
            with safe_open(str(self.file_of[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name)  # may be a view of a private mapping of the whole file
                out[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=True)
                del tensor
        return out


def build_skeleton(path, dtype: torch.dtype) -> tuple[nn.Module, _Shards, str]:
    """The model of checkpoint `path` with its decoder layers on the meta device and everything else read into
    host memory at `dtype` (a slimflow pruned checkpoint gets its recorded widths). Returns the model, the shard
    reader and the state-dict prefix of the decoder layers (`model.layers`)."""
    from slimflow.surgery import LayerWidths, apply_widths
    from transformers import AutoModelForCausalLM, GenerationConfig

    from slimflow.models import read_config

    path = Path(path)
    data = read_config(path)
    config = _stock_config(data, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    widths = [LayerWidths(**w) for w in data.get(WIDTHS_KEY) or []]
    if widths:
        apply_widths(model, widths)
    shards = _Shards(path)
    prefix = _layers_prefix(model)
    state = model.state_dict(keep_vars=True)
    resident = [n for n in state if not n.startswith(prefix + ".")]
    stored = [n for n in resident if n in shards.file_of]
    tensors = shards.read(stored, "cpu", dtype)
    tied = getattr(model.config, "tie_word_embeddings", False)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    absent = [n for n in result.missing_keys if not n.startswith(prefix + ".")]
    if tied:
        model.tie_weights()
        absent = [n for n in absent if model.get_submodule(n.rpartition(".")[0]) is not model.get_output_embeddings()]
    if absent:
        raise StreamingError(f"the checkpoint at {path} has no tensor {absent[0]!r}")
    _rebuild_meta_buffers(model, "cpu")
    model.config.dtype = dtype
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), shards, prefix


def _layers_prefix(model: nn.Module) -> str:
    layers = get_adapter(model).layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise StreamingError("could not locate the decoder layers in the model")


class StreamingLayers:
    """A layer store for `slimflow.pipeline.prune_layers`: `fetch` reads layer `index` from the source shards
    straight onto the device, `release` writes the pruned layer (cast to `save_dtype`) as its own output shard
    and returns it to the meta device."""

    def __init__(self, shards: _Shards, prefix: str, dtype: torch.dtype, save_dtype: torch.dtype, directory: Path,
                 num_layers: int):
        self.shards, self.prefix, self.dtype, self.save_dtype = shards, prefix, dtype, save_dtype
        self.directory, self.total = directory, num_layers + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.total:05d}.safetensors"

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None:
        names = list(layer.state_dict(keep_vars=True))
        full = [f"{self.prefix}.{index}.{n}" for n in names]
        tensors = self.shards.read(full, device, self.dtype)
        layer.load_state_dict({n: tensors[f] for n, f in zip(names, full)}, strict=True, assign=True)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to(device="cpu", dtype=self.save_dtype)
        tensors = {f"{self.prefix}.{index}.{n}": t.detach().contiguous() for n, t in layer.state_dict().items()}
        self.write(index + 1, tensors)
        layer.to("meta")
        del tensors
        _return_freed_memory()

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard_name(number)
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()


class StreamingCheckpoint:
    """The model of a checkpoint being pruned layer by layer into an output directory (see
    `streaming_checkpoint`): `model` has its decoder layers on the meta device, `layers` is the layer store to
    pass to `slimflow.prune(..., layer_store=...)`, and `finish` writes the rest once every layer is done."""

    def __init__(self, source, dtype: torch.dtype, save_dtype: torch.dtype):
        self.dtype, self.save_dtype = dtype, save_dtype
        self.model, self.shards, self.prefix = build_skeleton(Path(source), dtype)
        self.layers: StreamingLayers | None = None
        self.finished = False

    def open(self, directory: Path) -> None:
        num_layers = len(get_adapter(self.model).layers(self.model))
        self.directory = directory
        self.layers = StreamingLayers(self.shards, self.prefix, self.dtype, self.save_dtype, directory, num_layers)

    def finish(self, tokenizer=None, report=None) -> None:
        """Write the resident tensors (embeddings, final norm, head), the shard index and the metadata."""
        layers = self.layers
        if len(set(layers.weight_map.values())) != layers.total - 1:
            raise StreamingError("finish() called before every decoder layer was pruned and written")
        self.model.to(dtype=self.save_dtype)
        tensors, seen = {}, set()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(self.prefix + ".") or id(tensor) in seen:
                continue
            seen.add(id(tensor))  # tied output embeddings: stored once, under the input embedding's name
            tensors[name] = tensor.detach().to("cpu").contiguous()
        layers.write(layers.total, tensors)
        index = {"metadata": {"total_size": layers.total_size},
                 "weight_map": dict(sorted(layers.weight_map.items()))}
        (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        write_metadata(self.model, self.directory, tokenizer, report, _embeddings_tied(self.model), self.save_dtype)
        self.finished = True


@contextlib.contextmanager
def streaming_checkpoint(source, output, dtype: torch.dtype = torch.float32, save_dtype: torch.dtype | None = None,
                         overwrite: bool = False):
    """Prune checkpoint `source` into `output` without holding its decoder layers in memory together:

        with streaming_checkpoint(source, output, torch.bfloat16) as stream:
            report = slimflow.prune(stream.model, ids, ratio=0.2, device="cuda", layer_store=stream.layers)
            stream.finish(tokenizer, report)

    The output appears at `output` only when the block completes (written to a temporary sibling first, as
    `save_pruned` does); on an error nothing is left behind."""
    stream = StreamingCheckpoint(source, dtype, save_dtype or dtype)
    with staged_directory(stream.model, output, overwrite) as directory:
        stream.open(directory)
        yield stream
        if not stream.finished:
            raise StreamingError("the streaming block ended without finish(): nothing was written")


def prune_streaming(source, output, calibration: torch.Tensor, ratio: float = 0.2, *, tokenizer=None,
                    dtype: torch.dtype = torch.float32, save_dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, method: "str | PruningMethod" = "slimgpt", overwrite: bool = False,
                    record: dict | None = None, **prune_kwargs):
    """`slimflow.prune` + `save_pruned` of the checkpoint directory `source` into `output`, streaming layer by
    layer (identical weights, bounded host memory). `prune_kwargs` are `slimflow.prune`'s (schedule, spread,
    ...); `method` is a name, options or a method, as there; `record` adds entries to pruning.json. Returns the
    `PruneReport`."""
    from slimflow.api import prune
    from slimflow.methods import get_method

    method = get_method(method, **(prune_kwargs.pop("method_kwargs", None) or {}))
    check_streamable(method)
    dev = torch.device(device) if device not in (None, "auto") else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    with streaming_checkpoint(source, output, dtype, save_dtype, overwrite) as stream:
        report = prune(stream.model, calibration, ratio, method=method, device=dev, layer_store=stream.layers,
                       **prune_kwargs)
        stream.finish(tokenizer, report.to_dict() | (record or {}))
    return report
