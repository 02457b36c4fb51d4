"""What the whole-model passes of a prune need on the processing device, checked before any work.

Layer-wise pruning moves one decoder layer at a time to the device, so any model fits. Sampling calibration
sequences from the model, the adaptive schedule's gradient pass and the scoring of its candidates run the whole
model there (docs/engine.md, "Device memory"): a device too small for that fails here with the numbers and the
fix, not minutes later with an out-of-memory traceback.
"""

from __future__ import annotations

import torch
from torch import nn

from slimflow.errors import InsufficientMemoryError

GIB = 1 << 30
MIB = 1 << 20


def format_bytes(n: int) -> str:
    """`n` bytes in GiB to one decimal, or in MiB below 1 GiB (so that a small model's need never reads 0.0)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are held now."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def sampling_cache_bytes(config, batch: int, seqlen: int, dtype: torch.dtype) -> int:
    """Bytes of the key/value cache that sampling `batch` sequences of `seqlen` tokens fills at its end."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * heads * head_dim * batch * seqlen * itemsize


def whole_model_need(model: nn.Module, device: torch.device, *, sampling_batch: int = 0, seqlen: int = 0,
                     search_copy: bool = False) -> dict[str, int]:
    """Lower bounds, in bytes, of what the whole-model passes put on `device` beyond what is there already:
    the weights if the model lives elsewhere (it is moved there for the pass; the search scores a copy there),
    plus the larger of the sampling cache (`sampling_batch` sequences of `seqlen`) and the search's copy of a
    model that lives on `device` (`search_copy`). Activations come on top and depend on the batch size."""
    weights = weight_bytes(model)
    home = next(model.parameters()).device
    resident = 0 if _same_device(home, device) else weights
    cache = sampling_cache_bytes(model.config, sampling_batch, seqlen, next(model.parameters()).dtype) \
        if sampling_batch else 0
    copy = weights if search_copy and resident == 0 else 0
    return {"weights": resident, "cache": cache, "copy": copy, "total": resident + max(cache, copy)}


def check_whole_model_fits(model: nn.Module, device: torch.device, what: str, *, sampling_batch: int = 0,
                           seqlen: int = 0, search_copy: bool = False, free: int | None = None,
                           adaptive: bool = True) -> None:
    """Raise `InsufficientMemoryError` if `whole_model_need` exceeds the free memory of the CUDA `device`
    (`free`: that amount instead of asking the device; `adaptive`: the passes are the adaptive schedule's, so a
    fixed schedule is one of the fixes). Other devices are not checked (host memory is the loader's concern)."""
    if device.type != "cuda":
        return
    need = whole_model_need(model, device, sampling_batch=sampling_batch, seqlen=seqlen, search_copy=search_copy)
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    if need["total"] <= free:
        return
    parts = [f"weights {format_bytes(need['weights'])}"] if need["weights"] else []
    if need["cache"] >= need["copy"] and need["cache"]:
        parts.append(f"key/value cache of {sampling_batch} sampled sequences of {seqlen} tokens "
                     f"{format_bytes(need['cache'])}")
    elif need["copy"]:
        parts.append(f"the search's copy of the model {format_bytes(need['copy'])}")
    fixes = []
    if need["cache"]:
        fixes.append(f"set generated_samples to 0 (--generated-samples 0; then about "
                     f"{format_bytes(need['weights'] + need['copy'])})")
    if adaptive:
        fixes.append("use a fixed schedule such as log_increase (one layer at a time on the device)")
    if need["copy"]:
        fixes.append("keep the model on the CPU (it is moved to the device for each whole-model pass)")
    fixes.append("or a device with more free memory")
    raise InsufficientMemoryError(
        f"{what} runs the whole model on {device}: it needs at least {format_bytes(need['total'])} there "
        f"({', '.join(parts)}) and {format_bytes(free)} are free: {', '.join(fixes)}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
