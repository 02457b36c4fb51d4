"""Export a slimflow model (pruned or dense) to one GGUF file that llama.cpp runs: its `deci` architecture.

`deci` is llama.cpp's heterogeneous LLaMA (written for NVIDIA's NAS-pruned Nemotron models). What it reads,
from llama.cpp's src/llama-model.cpp, src/models/deci.cpp and src/llama-hparams.cpp, and what is written here:

- `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length` are read with
  `get_key_or_arr`, so each is one entry per layer.
- The head dimension is `deci.attention.key_length` / `value_length`. Without them llama.cpp derives it as
  `embedding_length / head_count[0]`, which is wrong as soon as layer 0 lost heads, so both are always written.
  `rope.dimension_count` must equal `key_length` (partial rotary is refused by llama.cpp for deci).
- deci ropes with llama.cpp's "normal" rope (pairs of consecutive values) while Hugging Face LLaMA rotates the
  two halves of each head, so the rows of q and k (and of their biases) are permuted per head.
- q/k/v biases are loaded per layer with per-layer shapes (`create_tensor_qkv`), as are `attn_output.bias` and
  the FFN biases, so Qwen2 exports as is. `output.weight` is optional: without it (tied embeddings) llama.cpp
  reuses `token_embd.weight`. A layer with 0 heads would be attention-free and one with 0 FFN channels
  FFN-free; slimflow always keeps at least one unit, so neither is ever written.

The file is written next to the target under a temporary name and renamed into place at the end: a failure or
a refused input never leaves a partial file.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.quants import quantize
from torch import nn

from slimflow.errors import OutputExistsError, SlimflowUserError
from slimflow.export.gguf_vocab import UnsupportedTokenizerError, vocab_from_tokenizer

ARCH = "deci"
DTYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPE = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0}
_Q8_BLOCK = 32


class GGUFExportError(SlimflowUserError, ValueError):
    """A model, tokenizer or option the GGUF export cannot write faithfully; the message says why."""


# ------------------------------------------------------------------------------------------------ families


def _no_refusal(config) -> str | None:
    return None


def _mistral_check(config) -> str | None:
    return None  # a sliding window is dropped, as llama.cpp's own converter does; see _warnings()


def _qwen2_check(config) -> str | None:
    if getattr(config, "use_sliding_window", False):
        return "Qwen2 with use_sliding_window=true: llama.cpp's deci architecture has no sliding-window attention"
    return None


@dataclass(frozen=True)
class GGUFFamily:
    """How one model family maps onto deci. A new family that deci can express is one entry in `FAMILIES`:
    its norm module names and a `check(config)` returning a refusal reason (or None)."""

    attn_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    final_norm: str = "norm"
    check: Callable[[object], str | None] = _no_refusal


FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(),
    "mistral": GGUFFamily(check=_mistral_check),
    "qwen2": GGUFFamily(check=_qwen2_check),
}


# Families slimflow prunes but whose layers llama.cpp's deci graph cannot (or this exporter does not yet) express.
_NOT_DECI = {
    "gemma2": "Gemma-2 scales the embeddings, normalises with (1 + weight), has post-attention and post-FFN norms, "
              "GELU and logit soft-capping, none of which llama.cpp's deci graph computes",
    "phi3": "Phi-3 stores fused qkv_proj / gate_up_proj, which this exporter does not split yet, and its "
            "long-context models use longrope scaling",
}


def gguf_family(config) -> GGUFFamily:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        reason = _NOT_DECI.get(model_type, "llama.cpp's deci architecture runs LLaMA-layout models only (RMSNorm, "
                                           "SwiGLU, full rotary)")
        raise GGUFExportError(f"GGUF export does not support model_type={model_type!r}: {reason}; supported: "
                              f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


# ------------------------------------------------------------------------------------------------ checks


def _rope(config) -> tuple[float, dict]:
    """(rope theta, scaling) of the config; refuses scalings llama.cpp's deci graph does not reproduce."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise GGUFExportError(f"GGUF export supports rope types default, linear and llama3; this model uses {kind!r}")
    if params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise GGUFExportError("GGUF export needs rotary embedding over the whole head (partial_rotary_factor=1)")
    return float(theta), {**params, "rope_type": kind}


def check_exportable(model: nn.Module) -> GGUFFamily:
    """The family entry of `model`, or a `GGUFExportError` saying what deci cannot express."""
    config = model.config
    family = gguf_family(config)
    reason = family.check(config)
    if reason:
        raise GGUFExportError(f"cannot export to GGUF: {reason}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"GGUF export (deci) computes SwiGLU with SiLU; this model uses hidden_act={act!r}")
    _rope(config)
    return family


def _warnings(config) -> list[str]:
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        return [f"the model attends within a sliding window of {window} tokens; llama.cpp attends to the whole "
                f"context, so outputs match only for contexts up to {window} tokens"]
    return []


# ------------------------------------------------------------------------------------------------ tensors


def _rope_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from HF's [first halves | second halves] to consecutive pairs (llama.cpp)."""
    head_dim = weight.shape[0] // n_heads
    shape = weight.shape
    return weight.reshape(n_heads, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The array and GGML type of one tensor; 1-D tensors (norms, biases) always stay f32 as llama.cpp expects."""
    tensor = tensor.detach().to("cpu")
    if tensor.dim() == 1 or dtype == "f32":
        return tensor.to(torch.float32).contiguous().numpy(), GGMLQuantizationType.F32
    if dtype == "q8_0" and tensor.shape[-1] % _Q8_BLOCK == 0:
        data = tensor.to(torch.float32).contiguous().numpy()
        return quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), GGMLQuantizationType.BF16
    # f16, and q8_0 rows that are not a multiple of the 32-value block (as llama.cpp's converter falls back)
    return tensor.to(torch.float16).contiguous().numpy(), GGMLQuantizationType.F16


def _llama3_rope_factors(params: dict, head_dim: int, theta: float) -> torch.Tensor:
    """The frequency divisors of LLaMA-3.1 rope scaling, which llama.cpp reads from `rope_freqs.weight`."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_len = params.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def model_tensors(model: nn.Module, family: GGUFFamily):
    """(GGUF name, tensor) for every weight of `model`, q/k rows permuted for llama.cpp's rope."""
    from slimflow.adapters import get_adapter

    adapter = get_adapter(model)
    decoder = adapter.decoder(model)
    yield "token_embd.weight", model.get_input_embeddings().weight
    for i, layer in enumerate(adapter.layers(model)):
        heads, kv_heads = adapter.layer_heads(model, layer)
        q, k, v, o = adapter.attention_linears(layer)  # the families llama.cpp's deci graph runs are not fused
        gate, up, down = adapter.mlp_linears(layer)
        yield f"blk.{i}.attn_norm.weight", getattr(layer, family.attn_norm).weight
        yield f"blk.{i}.ffn_norm.weight", getattr(layer, family.ffn_norm).weight
        for name, linear, n_rot_heads in (("attn_q", q, heads), ("attn_k", k, kv_heads), ("attn_v", v, None),
                                          ("attn_output", o, None), ("ffn_gate", gate, None), ("ffn_up", up, None),
                                          ("ffn_down", down, None)):
            for kind in ("weight", "bias"):
                tensor = getattr(linear, kind, None)
                if tensor is None:
                    continue
                yield f"blk.{i}.{name}.{kind}", _rope_permute(tensor.data, n_rot_heads) if n_rot_heads else tensor
    yield "output_norm.weight", getattr(decoder, family.final_norm).weight
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        yield "output.weight", output.weight


# ------------------------------------------------------------------------------------------------ writing


def write_gguf(model: nn.Module, tokenizer, path, dtype: str = "f16", overwrite: bool = False,
               name: str | None = None) -> dict:
    """Write `model` (a Hugging Face causal LM, pruned by slimflow or dense) and its fast `tokenizer` to `path`.

    Returns a summary: path, dtype, file size, per-layer widths, tensors that fell back from q8_0 to f16,
    and warnings. Raises `GGUFExportError` for anything the file could not express faithfully."""
    from slimflow.adapters import get_adapter
    from slimflow.surgery import layer_widths

    if dtype not in DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise GGUFExportError(f"the output file must end in .gguf, got {path}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists: choose another --output or pass --overwrite")
    if path.is_dir():
        raise GGUFExportError(f"{path} is a directory; --output names the .gguf file to write")
    family = check_exportable(model)
    config, adapter = model.config, get_adapter(model)
    widths = layer_widths(model, adapter)
    head_dim = adapter.head_dim(model)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    try:
        vocab = vocab_from_tokenizer(tokenizer, n_vocab)
    except UnsupportedTokenizerError as error:
        raise GGUFExportError(f"cannot export the tokenizer to GGUF: {error}") from error
    theta, rope = _rope(config)

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    fallback = []
    try:
        writer = GGUFWriter(staging, arch=ARCH)
        writer.add_name(name or getattr(config, "_name_or_path", None) or "slimflow model")
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(len(widths))
        writer.add_feed_forward_length([w.intermediate_size for w in widths])
        writer.add_head_count([w.num_attention_heads for w in widths])
        writer.add_head_count_kv([w.num_key_value_heads for w in widths])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(_FILE_TYPE[dtype])
        vocab.write(writer)

        tensors = list(model_tensors(model, family))
        if rope["rope_type"] == "llama3":
            tensors.append(("rope_freqs.weight", _llama3_rope_factors(rope, head_dim, theta)))
        for tensor_name, tensor in tensors:
            if not torch.isfinite(tensor).all():
                raise GGUFExportError(f"the weight {tensor_name} holds NaN or infinite values; the model is corrupt")
            data, qtype = _encode(tensor, dtype)
            if dtype == "q8_0" and tensor.dim() > 1 and qtype != GGMLQuantizationType.Q8_0:
                fallback.append(tensor_name)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return {"path": str(path), "dtype": dtype, "bytes": path.stat().st_size, "architecture": ARCH,
            "layer_widths": [w.to_dict() for w in widths], "head_dim": head_dim, "tokenizer": vocab.model,
            "pre_tokenizer": vocab.pre, "f16_fallback": fallback, "warnings": _warnings(config)}


def export_gguf(model: str, output: str, dtype: str = "f16", overwrite: bool = False) -> dict:
    """Load a slimflow checkpoint (or a dense Hugging Face directory) and write it as GGUF (see `write_gguf`)."""
    from slimflow.models import check_model_source, load_tokenizer

    source = Path(model)
    if not source.is_dir():
        raise GGUFExportError(f"no model directory at {model}: --model takes a slimflow checkpoint or a Hugging Face "
                              "model directory")
    if dtype not in DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if Path(output).exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists: choose another --output or pass --overwrite")
    check_model_source(model)  # config.json and complete safetensors files, named when not
    try:
        net = _load_stored_dtype(source)
    except Exception as error:  # unreadable weights or config: one line, and no file is written
        raise GGUFExportError(f"cannot load the model in {model}: {str(error).splitlines()[0]}") from error
    check_exportable(net)
    try:
        tokenizer = load_tokenizer(str(source))
    except Exception as error:
        raise GGUFExportError(f"cannot load the tokenizer in {model} (GGUF needs its vocabulary): "
                              f"{str(error).splitlines()[0]}") from error
    return write_gguf(net, tokenizer, output, dtype=dtype, overwrite=overwrite, name=source.name)


def _load_stored_dtype(source: Path) -> nn.Module:
    """The model in the dtype it is stored in (each tensor is converted on its own while writing), through
    slimflow's one loader (pruned checkpoints at their widths, dense directories with `from_pretrained`)."""
    from slimflow.models import load_model, source_dtype

    return load_model(source, dtype=source_dtype(source), device="cpu")
