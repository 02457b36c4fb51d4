"""Sequential layer-by-layer calibration: capture layer-0 inputs once, then prune each layer on the outputs of
the already-pruned layers before it (errors propagate, as in OBS-style one-shot pruning).

Per layer: (1) run to `o_proj`, accumulate its input Hessian, prune head units; (2) run to `down_proj`,
accumulate, prune channels; (3) run the pruned layer to produce the next layer's inputs. Passes (1) and (2)
stop at the hooked projection, so no work past it is done. Pass (1) also stores the `o_proj` inputs: removing
head units leaves the kept heads' outputs unchanged, so passes (2) and (3) replay them through the pruned
`o_proj` instead of recomputing q/k/v and attention (`_AttentionReplay`). Only the current layer needs to be
on `device`; see docs/performance.md.
"""

from __future__ import annotations

import math
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


class _AttentionReplay:
    """Stands in for a layer's attention block, returning `o_proj(stored o_proj inputs)` for the current batch.

    The stored inputs are the dense attention outputs of pass (1). Removing head units changes neither the
    kept heads' q/k/v nor their attention, so after head surgery the block's output is exactly
    `o_proj(stored[..., kept columns])`; the replay skips q/k/v projections and attention in passes (2) and (3).
    """

    def __init__(self, attn: nn.Module, o_proj: nn.Module, inputs: torch.Tensor):
        self.attn, self.o_proj, self.inputs = attn, o_proj, inputs
        self.cols: torch.Tensor | None = None
        self.span = (0, 0)

    def _forward(self, *args, **kwargs):
        x = self.inputs[self.span[0] : self.span[1]]
        if self.cols is not None:
            x = x.index_select(-1, self.cols)
        return self.o_proj(x), None

    def __enter__(self):
        self.attn.forward = self._forward
        return self

    def __exit__(self, *exc):
        del self.attn.forward


def _batches(n: int, batch_size: int, replay: _AttentionReplay | None, span: list):
    for start in range(0, n, batch_size):
        span[:] = [start, min(start + batch_size, n)]
        if replay is not None:
            replay.span = tuple(span)
        yield start


def _run_to(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, kwargs_by_size: dict, batch_size: int,
            stats: HessianAccumulator, replay: _AttentionReplay | None = None,
            record: tuple[nn.Module, torch.Tensor] | None = None) -> None:
    """Feed all sequences through `layer` until `module`, accumulating statistics of `module`'s input.

    `replay` stands in for the attention block; `record=(m, buffer)` stores the inputs of module `m` in `buffer`."""
    span = [0, 0]

    def hook(mod, args):
        stats.add(args[0])
        raise _Stop

    handles = []
    if record is not None:
        rec_module, buffer = record
        handles.append(rec_module.register_forward_pre_hook(lambda m, a: buffer[span[0] : span[1]].copy_(a[0])))
    handles.append(module.register_forward_pre_hook(hook))
    try:
        with replay or _nothing():
            for start in _batches(hidden.shape[0], batch_size, replay, span):
                batch = hidden[start : start + batch_size]
                try:
                    layer(batch, **kwargs_by_size[batch.shape[0]])
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def _propagate(layer: nn.Module, hidden: torch.Tensor, kwargs_by_size: dict, batch_size: int,
               replay: _AttentionReplay | None = None) -> None:
    with replay or _nothing():
        for start in _batches(hidden.shape[0], batch_size, replay, [0, 0]):
            batch = hidden[start : start + batch_size]
            out = layer(batch, **kwargs_by_size[batch.shape[0]])
            hidden[start : start + batch_size] = out[0] if isinstance(out, tuple) else out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _errors(old: torch.Tensor, new: torch.Tensor, removed_cols: list[int], stats: HessianAccumulator):
    h = stats.hessian.to(old.dtype)
    cols = torch.as_tensor(removed_cols, dtype=torch.long, device=old.device)
    # plain deletion changes only the removed columns: ½ tr(W_M H_MM W_Mᵀ), no full-width product needed
    return output_error(new - old, h), output_error(old[:, cols], h[cols][:, cols])


def _set_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        if linear.bias is None:
            raise ValueError("the method returned a bias for a projection without one (see PruningMethod.adds_bias)")
        linear.bias.data.add_(bias.to(linear.bias.dtype))


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
    # Methods that hook modules in `begin_layer` see every pass run in full (no attention replay).
    can_replay = type(method).begin_layer is PruningMethod.begin_layer
    transfer = 0.0
    bar = tqdm(total=len(layers), desc="pruning layers", unit="layer", disable=not progress)
    for index, (layer, plan) in enumerate(zip(layers, plans)):
        t = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(device, non_blocking=True)
        transfer += time.perf_counter() - t
        last = index == len(layers) - 1
        replay, record = None, None
        heads, kv = adapter.layer_heads(model, layer)
        unit_size = (heads // kv) * head_dim
        method.begin_layer(index, layer, adapter)
        _, _, _, o_proj = adapter.attention_projections(layer)
        channels = adapter.layer_intermediate(layer)
        result = LayerResult(index, plan.ratio, heads, list(range(kv)), channels, list(range(channels)),
                             surgery.LayerWidths(heads, kv, channels))

        if plan.remove_units:
            t = time.perf_counter()
            stats = HessianAccumulator(o_proj.in_features, device, stats_dtype)
            if can_replay and not (last and not plan.remove_channels):
                record = (o_proj, torch.empty(*hidden.shape[:-1], o_proj.in_features, dtype=hidden.dtype,
                                              device=device))
            _run_to(layer, o_proj, hidden, kwargs_by_size, batch_size, stats, record=record)
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
            _set_weight(o_proj, decision.weight, decision.bias)
            result.kept_units = [u for u in range(kv) if u not in set(decision.removed)]
            surgery.prune_heads(adapter, layer, head_dim, result.kept_units)
            if record is not None:
                o_proj = adapter.attention_projections(layer)[3]
                replay = _AttentionReplay(adapter.attn(layer), o_proj, record[1])
                replay.cols = (torch.as_tensor(result.kept_units, device=device)[:, None] * unit_size
                               + torch.arange(unit_size, device=device)).reshape(-1)
            times.surgery += time.perf_counter() - t
            del stats

        if plan.remove_channels:
            _, _, down = adapter.mlp_projections(layer)
            t = time.perf_counter()
            stats = HessianAccumulator(down.in_features, device, stats_dtype)
            record = None
            if can_replay and replay is None and not last:  # no head pass: keep this pass's attention outputs
                o_proj = adapter.attention_projections(layer)[3]
                record = (o_proj, torch.empty(*hidden.shape[:-1], o_proj.in_features, dtype=hidden.dtype,
                                              device=device))
            _run_to(layer, down, hidden, kwargs_by_size, batch_size, stats, replay=replay, record=record)
            if record is not None:
                replay = _AttentionReplay(adapter.attn(layer), record[0], record[1])
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
            _set_weight(down, decision.weight, decision.bias)
            removed = set(decision.removed)
            result.kept_channels = [c for c in range(channels) if c not in removed]
            surgery.prune_channels(adapter, layer, result.kept_channels)
            times.surgery += time.perf_counter() - t
            del stats

        t = time.perf_counter()
        if not last:
            _propagate(layer, hidden, kwargs_by_size, batch_size, replay=replay)
        del replay, record
        _sync(device)
        times.propagate += time.perf_counter() - t
        heads_now, kv_now = adapter.layer_heads(model, layer)
        result.widths = surgery.LayerWidths(heads_now, kv_now, adapter.layer_intermediate(layer))
        method.end_layer(index, layer)
        t = time.perf_counter()
        layer.to(home)
        transfer += time.perf_counter() - t
        results.append(result)
        bar.set_postfix(heads=heads_now, channels=result.widths.intermediate_size)
        bar.update()
    bar.close()
    times.extra["transfer"] = round(times.extra.get("transfer", 0.0) + transfer, 4)
    return results


def prune_global(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, method: PruningMethod,
                 target_params: float, device: torch.device, progress: bool = True,
                 max_layer_ratio: float = 0.9, times: PhaseTimes | None = None) -> list[LayerResult]:
    """Multi-shot whole-model pruning for methods with `prunes_globally` (e.g. LLM Surgeon).

    Shot t of `method.shots` asks `method.global_shot` for decisions that bring the removed parameters to
    `t/T·target_params`, writes the compensated weights and deletes the units, so the next shot sees the
    smaller model. The whole model is moved to `device`.
    """
    times = times or PhaseTimes()
    layers = adapter.layers(model)
    home = next(model.parameters()).device
    model.to(device)
    start_params = surgery.count_parameters(model)
    results, kept_units, kept_channels = [], [], []
    for index, layer in enumerate(layers):
        heads, kv = adapter.layer_heads(model, layer)
        channels = adapter.layer_intermediate(layer)
        kept_units.append(list(range(kv)))
        kept_channels.append(list(range(channels)))
        results.append(LayerResult(index, 0.0, heads, list(range(kv)), channels, list(range(channels)),
                                   surgery.LayerWidths(heads, kv, channels)))
    floors = [(max(1, math.ceil(len(u) * (1 - max_layer_ratio))), max(1, math.ceil(len(c) * (1 - max_layer_ratio))))
              for u, c in zip(kept_units, kept_channels)]
    head_dim = adapter.head_dim(model)
    shots = getattr(method, "shots", 1)
    try:
        for shot in tqdm(range(1, shots + 1), desc="pruning shots", unit="shot", disable=not progress):
            todo = target_params * shot / shots - (start_params - surgery.count_parameters(model))
            if todo <= 0:
                continue
            t = time.perf_counter()
            limits = [(len(u) - fu, len(c) - fc) for u, c, (fu, fc) in zip(kept_units, kept_channels, floors)]
            decisions = method.global_shot(model, adapter, input_ids, todo, device, limits)
            _sync(device)
            times.statistics += time.perf_counter() - t
            t = time.perf_counter()
            for index, (heads_d, chans_d) in decisions.items():
                layer, result = layers[index], results[index]
                if heads_d is not None:
                    o_proj = adapter.attention_projections(layer)[3]
                    _set_weight(o_proj, heads_d.weight, heads_d.bias)
                    drop = set(heads_d.removed)
                    keep = [u for u in range(len(kept_units[index])) if u not in drop]
                    surgery.prune_heads(adapter, layer, head_dim, keep)
                    kept_units[index] = [kept_units[index][u] for u in keep]
                    result.attn_error += getattr(heads_d, "cost", 0.0)
                if chans_d is not None:
                    down = adapter.mlp_projections(layer)[2]
                    _set_weight(down, chans_d.weight, chans_d.bias)
                    drop = set(chans_d.removed)
                    keep = [c for c in range(len(kept_channels[index])) if c not in drop]
                    surgery.prune_channels(adapter, layer, keep)
                    kept_channels[index] = [kept_channels[index][c] for c in keep]
                    result.ffn_error += getattr(chans_d, "cost", 0.0)
            times.surgery += time.perf_counter() - t
    finally:
        model.to(home)
    for index, (layer, result) in enumerate(zip(layers, results)):
        heads_now, kv_now = adapter.layer_heads(model, layer)
        result.kept_units, result.kept_channels = kept_units[index], kept_channels[index]
        result.widths = surgery.LayerWidths(heads_now, kv_now, adapter.layer_intermediate(layer))
        # the mean of the removed head and channel shares (the method sets them independently)
        result.ratio = 1 - (heads_now / result.heads_before + result.widths.intermediate_size / result.channels_before) / 2
    return results
