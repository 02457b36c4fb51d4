"""Physical removal of attention units and FFN channels: smaller Linear modules, consistent attributes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimflow.adapters import ModelAdapter, get_adapter


@dataclass(frozen=True)
class LayerWidths:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_indices(keep: list[int], size: int, what: str) -> list[int]:
    """`keep` sorted, refusing duplicates (they would silently copy a unit) and indices outside `[0, size)`."""
    keep = sorted(int(i) for i in keep)
    if len(set(keep)) != len(keep):
        raise ValueError(f"duplicate {what} indices in {keep}")
    if keep[0] < 0 or keep[-1] >= size:
        raise IndexError(f"{what} indices must lie in [0, {size}); got {keep[0]}..{keep[-1]}")
    return keep


def prune_heads(adapter: ModelAdapter, layer: nn.Module, head_dim: int, keep_units: list[int]) -> None:
    """Keep only the KV groups `keep_units` (indices into this layer's current KV heads).

    A unit is one KV head and its `g` query heads, so `g` - the module's `num_key_value_groups` - is unchanged.
    The adapter does the slicing (separate or fused projections)."""
    if not keep_units:
        raise ValueError("a layer must keep at least one attention head")
    _, kv = adapter.heads_of(layer, head_dim)
    adapter.slice_heads(layer, head_dim, _checked_indices(keep_units, kv, "unit"))


def prune_channels(adapter: ModelAdapter, layer: nn.Module, keep_channels: list[int]) -> None:
    """Keep only the FFN channels `keep_channels` (gate/up rows and down_proj columns)."""
    if not keep_channels:
        raise ValueError("a layer must keep at least one FFN channel")
    channels = adapter.layer_intermediate(layer)
    adapter.slice_channels(layer, _checked_indices(keep_channels, channels, "channel"))


def layer_widths(model: nn.Module, adapter: ModelAdapter | None = None) -> list[LayerWidths]:
    adapter = adapter or get_adapter(model)
    out = []
    for layer in adapter.layers(model):
        heads, kv = adapter.layer_heads(model, layer)
        out.append(LayerWidths(heads, kv, adapter.layer_intermediate(layer)))
    return out


def apply_widths(model: nn.Module, widths: list[LayerWidths], adapter: ModelAdapter | None = None) -> None:
    """Shrink a dense-shaped model to recorded widths, keeping the leading units (weights are loaded after)."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    if len(widths) != len(layers):
        raise ValueError(f"{len(widths)} recorded layer widths for a model with {len(layers)} layers")
    head_dim = adapter.head_dim(model)
    for layer, w in zip(layers, widths):
        heads, kv = adapter.layer_heads(model, layer)
        channels = adapter.layer_intermediate(layer)
        if w.num_key_value_heads > kv or w.intermediate_size > channels:
            raise ValueError(f"recorded widths {w} are wider than the model's layer; pruning only removes units")
        if w.num_attention_heads != w.num_key_value_heads * (heads // kv):
            raise ValueError("recorded widths change the query/KV group size, which slimflow never does")
        if w.num_key_value_heads != kv:
            prune_heads(adapter, layer, head_dim, list(range(w.num_key_value_heads)))
        if w.intermediate_size != channels:
            prune_channels(adapter, layer, list(range(w.intermediate_size)))
        # every layer, cut or not, carries its widths on its modules (as the bundled modeling file sets them)
        adapter.set_head_counts(adapter.attn(layer), w.num_attention_heads, w.num_key_value_heads)
        adapter.ffn(layer).intermediate_size = w.intermediate_size


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
