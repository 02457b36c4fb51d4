"""Sequences sampled from the model itself: calibration and held-out text that follows the model's own
distribution rather than one corpus (docs/engine.md, "Sampled calibration sequences")."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from tqdm.auto import tqdm


def _cache_argument(model: nn.Module) -> str:
    """The name transformers gives the key/value cache argument (`cache` from 5.24, `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_sequences(model: nn.Module, num_samples: int, seqlen: int, *, seed: int = 0, temperature: float = 1.0,
                     batch_size: int = 64, device: torch.device | str | None = None, start_token: int | None = None,
                     progress: bool = False) -> torch.Tensor:
    """`[num_samples, seqlen]` token ids sampled from `model` (ancestral sampling at `temperature`, no top-k or
    top-p), each sequence starting with `start_token` (default: the model's BOS token). Deterministic for a
    seed on a given device. The model runs where it is unless `device` is given (then it is moved there and
    back)."""
    if num_samples < 1 or seqlen < 2:
        raise ValueError(f"sample_sequences needs num_samples ≥ 1 and seqlen ≥ 2, got {num_samples} and {seqlen}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    start = model.config.bos_token_id if start_token is None else start_token
    if start is None:
        raise ValueError("the model config has no bos_token_id: pass start_token")
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.to(dev).eval()
    generator = torch.Generator(device=dev).manual_seed(seed)
    from transformers import DynamicCache

    cache_arg = _cache_argument(model)
    out = torch.empty(num_samples, seqlen, dtype=torch.long)
    try:
        for first in tqdm(range(0, num_samples, batch_size), desc="sampling sequences", unit="batch",
                          disable=not progress):
            n = min(batch_size, num_samples - first)
            ids = torch.full((n, 1), int(start), dtype=torch.long, device=dev)
            tokens, cache = [ids], DynamicCache(config=model.config)
            for _ in range(seqlen - 1):
                result = model(input_ids=ids, use_cache=True, **{cache_arg: cache})  # fills `cache` in place
                probs = torch.softmax(result.logits[:, -1].float() / temperature, dim=-1)
                ids = torch.multinomial(probs, 1, generator=generator)
                tokens.append(ids)
            out[first : first + n] = torch.cat(tokens, dim=1).cpu()
            del cache
    finally:
        model.to(home).train(was_training)
    return out
