"""Sequential layer-by-layer calibration: capture layer-0 inputs once, then prune each layer on the outputs of
the already-pruned layers before it (errors propagate, as in OBS-style one-shot pruning).

Per layer: (1) run to `o_proj`, accumulate its input Hessian, prune head units; (2) run to `down_proj`,
accumulate, prune channels; (3) run the pruned layer to produce the next layer's inputs. Passes (1) and (2)
stop at the hooked projection, so no work past it is done. Only the current layer needs to be on `device`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slimflow import surgery
from slimflow.adapters import ModelAdapter
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import output_error
from slimflow.algorithms.schedules import LayerPlan
from slimflow.methods.base import PruningMethod


class _Stop(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


@dataclass
class LayerResult:
    index: int
    ratio: float
    heads_before: int
    kept_units: list[int]
    channels_before: int
    kept_channels: list[int]
    widths: surgery.LayerWidths
    attn_error: float = 0.0
    attn_error_uncompensated: float = 0.0
    ffn_error: float = 0.0
    ffn_error_uncompensated: float = 0.0
    damping_added: float = 0.0


@dataclass
class PhaseTimes:
    capture: float = 0.0
    statistics: float = 0.0
    selection: float = 0.0
    surgery: float = 0.0
    propagate: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: round(v, 4) for k, v in vars(self).items() if k != "extra"} | self.extra


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[torch.Tensor, dict[int, dict]]:
    """Hidden states entering layer 0 for every sequence, and the layer kwargs (rotary embeddings, mask, ...)
    keyed by batch size (they are identical for every batch of one size: no padding in calibration)."""
    decoder = adapter.decoder(model)
    first = adapter.layers(model)[0]
    moved = [m for m in decoder.children() if not isinstance(m, nn.ModuleList)]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    store: dict = {}

    def catch(module, args, kwargs):
        store["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    chunks, kwargs_by_size = [], {}
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                decoder(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            chunks.append(store["hidden"])
            kwargs_by_size.setdefault(batch.shape[0], store["kwargs"])
    finally:
        handle.remove()
        for m, home in zip(moved, homes):
            m.to(home)
    for kw in kwargs_by_size.values():
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
    return torch.cat(chunks), kwargs_by_size


def _run_to(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, kwargs_by_size: dict, batch_size: int,
            stats: HessianAccumulator) -> None:
    """Feed all sequences through `layer` until `module`, accumulating statistics of `module`'s input."""

    def hook(mod, args):
        stats.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for start in range(0, hidden.shape[0], batch_size):
            batch = hidden[start : start + batch_size]
            try:
                layer(batch, **kwargs_by_size[batch.shape[0]])
            except _Stop:
                pass
    finally:
        handle.remove()


def _propagate(layer: nn.Module, hidden: torch.Tensor, kwargs_by_size: dict, batch_size: int) -> None:
    for start in range(0, hidden.shape[0], batch_size):
        batch = hidden[start : start + batch_size]
        out = layer(batch, **kwargs_by_size[batch.shape[0]])
        hidden[start : start + batch_size] = out[0] if isinstance(out, tuple) else out


def _errors(old: torch.Tensor, new: torch.Tensor, removed_cols: list[int], stats: HessianAccumulator):
    h = stats.hessian.to(old.dtype)
    uncompensated = torch.zeros_like(old)
    uncompensated[:, removed_cols] = -old[:, removed_cols]
    return output_error(new - old, h), output_error(uncompensated, h)


def _set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    linear.weight.data.copy_(weight.to(linear.weight.dtype))


@torch.no_grad()
def prune_layers(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, plans: list[LayerPlan],
                 method: PruningMethod, device: torch.device, batch_size: int = 8, progress: bool = True,
                 stats_dtype: torch.dtype = torch.float32, times: PhaseTimes | None = None) -> list[LayerResult]:
    """Prune every decoder layer in place according to `plans`; returns one `LayerResult` per layer."""
    times = times or PhaseTimes()
    layers = adapter.layers(model)
    head_dim = adapter.head_dim(model)
    t0 = time.perf_counter()
    hidden, kwargs_by_size = capture_layer_inputs(model, adapter, input_ids, batch_size, device)
    _sync(device)
    times.capture += time.perf_counter() - t0
    results = []
    bar = tqdm(total=len(layers), desc="pruning layers", unit="layer", disable=not progress)
    for index, (layer, plan) in enumerate(zip(layers, plans)):
        home = next(layer.parameters()).device
        layer.to(device)
        heads, kv = adapter.layer_heads(model, layer)
        unit_size = (heads // kv) * head_dim
        _, _, _, o_proj = adapter.attention_projections(layer)
        channels = adapter.layer_intermediate(layer)
        result = LayerResult(index, plan.ratio, heads, list(range(kv)), channels, list(range(channels)),
                             surgery.LayerWidths(heads, kv, channels))

        if plan.remove_units:
            t = time.perf_counter()
            stats = HessianAccumulator(o_proj.in_features, device, stats_dtype)
            _run_to(layer, o_proj, hidden, kwargs_by_size, batch_size, stats)
            stats.check_finite(f"layer {index} o_proj")
            _sync(device)
            times.statistics += time.perf_counter() - t
            t = time.perf_counter()
            old = o_proj.weight.detach().to(stats_dtype)
            decision = method.prune_heads(old, stats, unit_size, plan.remove_units)
            cols = [c for u in decision.removed for c in range(u * unit_size, (u + 1) * unit_size)]
            result.attn_error, result.attn_error_uncompensated = _errors(old, decision.weight, cols, stats)
            result.damping_added = max(result.damping_added, decision.damping_added)
            _sync(device)
            times.selection += time.perf_counter() - t
            t = time.perf_counter()
            _set_weight(o_proj, decision.weight)
            result.kept_units = [u for u in range(kv) if u not in set(decision.removed)]
            surgery.prune_heads(adapter, layer, head_dim, result.kept_units)
            times.surgery += time.perf_counter() - t
            del stats

        if plan.remove_channels:
            _, _, down = adapter.mlp_projections(layer)
            t = time.perf_counter()
            stats = HessianAccumulator(down.in_features, device, stats_dtype)
            _run_to(layer, down, hidden, kwargs_by_size, batch_size, stats)
            stats.check_finite(f"layer {index} down_proj")
            _sync(device)
            times.statistics += time.perf_counter() - t
            t = time.perf_counter()
            old = down.weight.detach().to(stats_dtype)
            decision = method.prune_channels(old, stats, plan.remove_channels)
            result.ffn_error, result.ffn_error_uncompensated = _errors(old, decision.weight, decision.removed, stats)
            result.damping_added = max(result.damping_added, decision.damping_added)
            _sync(device)
            times.selection += time.perf_counter() - t
            t = time.perf_counter()
            _set_weight(down, decision.weight)
            removed = set(decision.removed)
            result.kept_channels = [c for c in range(channels) if c not in removed]
            surgery.prune_channels(adapter, layer, result.kept_channels)
            times.surgery += time.perf_counter() - t
            del stats

        t = time.perf_counter()
        if index < len(layers) - 1:
            _propagate(layer, hidden, kwargs_by_size, batch_size)
        _sync(device)
        times.propagate += time.perf_counter() - t
        heads_now, kv_now = adapter.layer_heads(model, layer)
        result.widths = surgery.LayerWidths(heads_now, kv_now, adapter.layer_intermediate(layer))
        layer.to(home)
        results.append(result)
        bar.set_postfix(heads=heads_now, channels=result.widths.intermediate_size)
        bar.update()
    bar.close()
    return results
