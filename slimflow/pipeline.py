"""Sequential layer-by-layer calibration: record every layer's own call arguments once, then prune each layer
on the outputs of the already-pruned layers before it (errors propagate, as in OBS-style one-shot pruning).

Per layer: (1) run to `o_proj`, accumulate its input Hessian, prune head units; (2) run to `down_proj`,
accumulate, prune channels; (3) run the pruned layer to produce the next layer's inputs. Passes (1) and (2)
stop at the hooked projection, so no work past it is done. Pass (1) also stores the `o_proj` inputs: removing
head units leaves the kept heads' outputs unchanged, so passes (2) and (3) replay them through the pruned
`o_proj` instead of recomputing q/k/v and attention (`_AttentionReplay`, swapped in for the attention module
while those passes run). Only the current layer needs to be on `device`; see docs/performance.md.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slimflow import surgery
from slimflow.adapters import ModelAdapter
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import output_error, refit_to_dense
from slimflow.algorithms.schedules import LayerPlan
from slimflow.distributed import DataParallel
from slimflow.errors import InvalidValueError
from slimflow.methods.base import Decision, PruningMethod


class ResidentLayers:
    """Where `prune_layers` gets each decoder layer from and puts it back: layers already in memory are moved to
    the processing device for their turn and back home afterwards. `slimflow.streaming.StreamingLayers` reads
    them from the checkpoint files instead and writes them out."""

    def __init__(self):
        self._homes: dict[int, torch.device] = {}

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None:
        self._homes[index] = next(layer.parameters()).device
        layer.to(device, non_blocking=True)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to(self._homes.pop(index))


class _Stop(Exception):
    """Raised once a pass has what it needs, to skip the rest of a forward pass."""


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


@contextmanager
def _timed(times: PhaseTimes, phase: str, device: torch.device):
    t = time.perf_counter()
    yield
    _sync(device)
    setattr(times, phase, getattr(times, phase) + time.perf_counter() - t)


# --------------------------------------------------------------------------------------------- layer inputs
@dataclass
class LayerInputs:
    """The calibration hidden states entering the current layer, and every layer's own call arguments.

    `hidden` starts as layer 0's input and is overwritten by each layer's output as the pipeline advances.
    `calls[i][b]` holds the keyword arguments the decoder passes to layer `i` for a batch of `b` sequences
    (attention mask of the layer's type, rotary embeddings, ...); they are the same for every batch of one
    size because calibration has no padding.
    """

    hidden: torch.Tensor
    calls: list[dict[int, dict]]
    dense: torch.Tensor | None = None  # the dense model's hidden states at the same layer (drift correction)

    def kwargs(self, index: int, batch_size: int) -> dict:
        return self.calls[index][batch_size]


class _CallRecorder(nn.Module):
    """Swapped in for decoder layer `index` during capture: stores the layer's call arguments and passes the
    hidden states through unchanged, so no layer computes anything. Attribute reads the decoder makes on
    its layers (e.g. `attention_type`) go to the real layer."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: dict):
        super().__init__()
        object.__setattr__(self, "_real", layer)  # not registered: the real layer is neither moved nor owned
        self.index, self.last, self.sink = index, last, sink

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise TypeError(f"{type(self._real).__name__} is called with positional arguments besides the hidden "
                            "states; slimflow replays layer calls by keyword (the family needs an adapter override)")
        if self.index == 0:
            self.sink["hidden"] = hidden
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
        self.sink.setdefault("calls", {})[self.index] = kwargs | {"use_cache": False}
        if self.last:
            raise _Stop
        return hidden


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> LayerInputs:
    """Hidden states entering layer 0 for every sequence and, per layer, the arguments the decoder calls it
    with. One pass of the decoder with every layer swapped for a `_CallRecorder`: only the embeddings, the
    rotary embedding and the mask construction run (on `device`)."""
    decoder = adapter.decoder(model)
    layers = adapter.layers(model)
    moved = [m for m in decoder.children() if not isinstance(m, nn.ModuleList)]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    sink: dict = {}
    real = list(layers)
    for i, layer in enumerate(real):
        layers[i] = _CallRecorder(layer, i, i == len(real) - 1, sink)
    for m in moved:
        m.to(device)
    chunks, calls = [], [dict() for _ in real]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            sink.clear()
            try:
                decoder(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            chunks.append(sink["hidden"])
            for i, kwargs in sink["calls"].items():
                calls[i].setdefault(batch.shape[0], kwargs)
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
        for m, home in zip(moved, homes):
            m.to(home)
    return LayerInputs(torch.cat(chunks), calls)


# ------------------------------------------------------------------------------------------ attention replay
class _AttentionReplay(nn.Module):
    """Stands in for a layer's attention block, returning `o_proj(stored o_proj inputs)` for the current batch.

    The stored inputs are the dense attention outputs of pass (1). Removing head units changes neither the
    kept heads' q/k/v nor their attention, so after head surgery the block's output is exactly
    `o_proj(stored[..., kept columns])`; the replay skips q/k/v projections and attention in passes (2) and (3).
    It is swapped in for the attention module only while those passes run (`swapped_into`), so the attention
    module itself, its `forward` and any hooks on it stay untouched.
    """

    def __init__(self, o_proj: nn.Module, inputs: torch.Tensor, cols: torch.Tensor | None = None):
        super().__init__()
        self.o_proj, self.inputs, self.cols = o_proj, inputs, cols
        self.span = (0, 0)

    def forward(self, *args, **kwargs):
        x = self.inputs[self.span[0] : self.span[1]]
        if self.cols is not None:
            x = x.index_select(-1, self.cols)
        return self.o_proj(x), None

    @contextmanager
    def swapped_into(self, adapter: ModelAdapter, layer: nn.Module):
        original = adapter.replace_attn(layer, self)
        try:
            yield self
        finally:
            adapter.replace_attn(layer, original)


@contextmanager
def _maybe_replay(replay: _AttentionReplay | None, adapter: ModelAdapter, layer: nn.Module):
    if replay is None:
        yield None
    else:
        with replay.swapped_into(adapter, layer):
            yield replay


def _batches(inputs: LayerInputs, index: int, batch_size: int, replay: _AttentionReplay | None):
    """`(start, stop, batch, kwargs)` over the calibration sequences; keeps the replay on the same span."""
    n = inputs.hidden.shape[0]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if replay is not None:
            replay.span = (start, stop)
        yield start, stop, inputs.hidden[start:stop], inputs.kwargs(index, stop - start)


def _run_to(layer: nn.Module, index: int, module: nn.Module, inputs: LayerInputs, batch_size: int,
            stats: HessianAccumulator, adapter: ModelAdapter, replay: _AttentionReplay | None = None,
            record: tuple[nn.Module, torch.Tensor] | None = None,
            dense: tuple[nn.Module, nn.Module] | None = None) -> None:
    """Feed all sequences through `layer` until `module`, accumulating statistics of `module`'s input.

    `replay` stands in for the attention block; `record=(m, buffer)` stores the inputs of module `m` in `buffer`;
    `dense=(dense_layer, its module)` also runs the unpruned copy of the layer on the dense model's hidden states
    (`inputs.dense`) so that the statistics get the cross term against the dense inputs of `module`."""
    span = [0, 0]
    seen: dict = {}

    def stop_at(mod, args):
        stats.add(args[0], dense=seen.pop("dense", None))
        raise _Stop

    def keep_dense(mod, args):
        seen["dense"] = args[0]
        raise _Stop

    handles = []
    if record is not None:
        rec_module, buffer = record
        handles.append(rec_module.register_forward_pre_hook(lambda m, a: buffer[span[0] : span[1]].copy_(a[0])))
    handles.append(module.register_forward_pre_hook(stop_at))
    if dense is not None:
        handles.append(dense[1].register_forward_pre_hook(keep_dense))
    try:
        with _maybe_replay(replay, adapter, layer):
            for start, stop, batch, kwargs in _batches(inputs, index, batch_size, replay):
                span[:] = [start, stop]
                if dense is not None:
                    try:
                        dense[0](inputs.dense[start:stop], **kwargs)
                    except _Stop:
                        pass
                try:
                    layer(batch, **kwargs)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def _propagate(layer: nn.Module, index: int, inputs: LayerInputs, batch_size: int, adapter: ModelAdapter,
               replay: _AttentionReplay | None = None, dense_layer: nn.Module | None = None) -> None:
    """Overwrite `inputs.hidden` with the (pruned) layer's outputs: the next layer's calibration inputs;
    with `dense_layer`, `inputs.dense` likewise with the unpruned layer's outputs on the dense hidden states."""
    with _maybe_replay(replay, adapter, layer):
        for start, stop, batch, kwargs in _batches(inputs, index, batch_size, replay):
            if dense_layer is not None:
                out = dense_layer(inputs.dense[start:stop], **kwargs)
                inputs.dense[start:stop] = out[0] if isinstance(out, tuple) else out
            out = layer(batch, **kwargs)
            inputs.hidden[start:stop] = out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------ one layer's steps
def _errors(old: torch.Tensor, new: torch.Tensor, removed_cols: list[int], stats: HessianAccumulator):
    h = stats.hessian.to(old.dtype)
    cols = torch.as_tensor(removed_cols, dtype=torch.long, device=old.device)
    # plain deletion changes only the removed columns: ½ tr(W_M H_MM W_Mᵀ), no full-width product needed
    return output_error(new - old, h), output_error(old[:, cols], h[cols][:, cols])


def _set_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        if linear.bias is None:
            raise ValueError("the method returned a bias for a projection without one (its prepare_model adds them)")
        linear.bias.data.add_(bias.to(linear.bias.dtype))


def _unit_columns(units: list[int], unit_size: int, device=None) -> torch.Tensor:
    units = torch.as_tensor(units, dtype=torch.long, device=device)
    return (units[:, None] * unit_size + torch.arange(unit_size, device=device)).reshape(-1)


@dataclass
class _LayerJob:
    """Everything the steps of one layer share; `replay` is set once the attention outputs are stored."""

    model: nn.Module
    adapter: ModelAdapter
    method: PruningMethod
    inputs: LayerInputs
    index: int
    layer: nn.Module
    plan: LayerPlan
    last: bool
    batch_size: int
    device: torch.device
    stats_dtype: torch.dtype
    times: PhaseTimes
    result: LayerResult
    unit_size: int
    replay_attention: bool = True
    data_parallel: DataParallel = field(default_factory=DataParallel.local)
    correct_drift: bool = False
    replay: _AttentionReplay | None = None
    dense_layer: nn.Module | None = None  # unpruned copy of the layer (drift correction)

    def dense_pair(self, find) -> tuple[nn.Module, nn.Module] | None:
        return None if self.dense_layer is None else (self.dense_layer, find(self.dense_layer))

    def start_weight(self, linear: nn.Linear, stats: HessianAccumulator) -> torch.Tensor:
        """The weight the method prunes: the projection's own, or its refit to the dense model's outputs."""
        weight = linear.weight.detach().to(self.stats_dtype)
        if stats.cross is None:
            return weight
        return refit_to_dense(weight, stats.hessian.to(self.stats_dtype), stats.cross.to(self.stats_dtype))

    def attention_buffer(self, o_proj: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
        hidden = self.inputs.hidden
        return o_proj, torch.empty(*hidden.shape[:-1], o_proj.in_features, dtype=hidden.dtype, device=self.device)


def _start_layer(model, adapter, inputs, index, layer, plan, last, settings: dict) -> _LayerJob:
    heads, kv = adapter.layer_heads(model, layer)
    channels = adapter.layer_intermediate(layer)
    result = LayerResult(index, plan.ratio, heads, list(range(kv)), channels, list(range(channels)),
                         surgery.LayerWidths(heads, kv, channels))
    job = _LayerJob(model, adapter, inputs=inputs, index=index, layer=layer, plan=plan, last=last, result=result,
                    unit_size=(heads // kv) * adapter.head_dim(model), **settings)
    if job.correct_drift:
        job.dense_layer = copy.deepcopy(layer)
    return job


def _collect_statistics(job: _LayerJob, module: nn.Linear, name: str, record=None, dense=None) -> HessianAccumulator:
    """Input statistics of `module` over all calibration sequences (pass (1) or (2))."""
    with _timed(job.times, "statistics", job.device):
        stats = HessianAccumulator(module.in_features, job.device, job.stats_dtype)
        _run_to(job.layer, job.index, module, job.inputs, job.batch_size, stats, job.adapter, job.replay, record,
                dense)
        job.data_parallel.reduce_hessian(stats)  # this rank's sequences -> all sequences
        stats.check_finite(f"layer {job.index} {name}")
    return stats


def _record_errors(job: _LayerJob, old: torch.Tensor, decision: Decision, removed_cols: list[int], stats) -> tuple:
    errors = _errors(old, decision.weight, removed_cols, stats)
    job.result.damping_added = max(job.result.damping_added, decision.damping_added)
    return errors


def _remove_head_units(job: _LayerJob) -> None:
    """Pass (1): `o_proj` statistics, the method's head decision, compensation, surgery; keeps the attention
    outputs for the replay when a later pass of this layer needs them."""
    o_proj = job.adapter.o_proj(job.layer)
    later_pass = job.plan.remove_channels or not job.last
    record = job.attention_buffer(o_proj) if job.replay_attention and later_pass else None
    stats = _collect_statistics(job, o_proj, "o_proj", record, job.dense_pair(job.adapter.o_proj))
    with _timed(job.times, "selection", job.device):
        old = job.start_weight(o_proj, stats)
        decision = job.data_parallel.broadcast_decision(
            job.method.prune_heads(old, stats, job.unit_size, job.plan.remove_units))
        cols = _unit_columns(decision.removed, job.unit_size).tolist()
        job.result.attn_error, job.result.attn_error_uncompensated = _record_errors(job, old, decision, cols, stats)
    with _timed(job.times, "surgery", job.device):
        _set_weight(o_proj, decision.weight, decision.bias)
        removed = set(decision.removed)
        job.result.kept_units = [u for u in range(len(job.result.kept_units)) if u not in removed]
        surgery.prune_heads(job.adapter, job.layer, job.adapter.head_dim(job.model), job.result.kept_units)
        if record is not None:
            job.replay = _AttentionReplay(job.adapter.o_proj(job.layer), record[1],
                                          _unit_columns(job.result.kept_units, job.unit_size, job.device))


def _remove_channels(job: _LayerJob) -> None:
    """Pass (2): `down_proj` statistics (attention replayed if pass (1) ran), decision, compensation, surgery."""
    down = job.adapter.down_proj(job.layer)
    record = None
    if job.replay_attention and job.replay is None and not job.last:  # no head pass: keep this pass's attention outputs for pass (3)
        record = job.attention_buffer(job.adapter.o_proj(job.layer))
    stats = _collect_statistics(job, down, "down_proj", record, job.dense_pair(job.adapter.down_proj))
    if record is not None:
        job.replay = _AttentionReplay(record[0], record[1])
    with _timed(job.times, "selection", job.device):
        old = job.start_weight(down, stats)
        decision = job.data_parallel.broadcast_decision(job.method.prune_channels(old, stats, job.plan.remove_channels))
        job.result.ffn_error, job.result.ffn_error_uncompensated = _record_errors(job, old, decision, decision.removed,
                                                                           stats)
    with _timed(job.times, "surgery", job.device):
        _set_weight(down, decision.weight, decision.bias)
        removed = set(decision.removed)
        job.result.kept_channels = [c for c in range(len(job.result.kept_channels)) if c not in removed]
        surgery.prune_channels(job.adapter, job.layer, job.result.kept_channels)


def _propagate_outputs(job: _LayerJob) -> None:
    """Pass (3): the pruned layer's outputs become the next layer's inputs."""
    with _timed(job.times, "propagate", job.device):
        if not job.last:
            _propagate(job.layer, job.index, job.inputs, job.batch_size, job.adapter, job.replay, job.dense_layer)
        job.replay = None
        job.dense_layer = None


def _finish_layer(job: _LayerJob) -> LayerResult:
    heads, kv = job.adapter.layer_heads(job.model, job.layer)
    job.result.widths = surgery.LayerWidths(heads, kv, job.adapter.layer_intermediate(job.layer))
    return job.result


def _prune_layer(job: _LayerJob) -> LayerResult:
    """One layer's steps, the method's layer hooks around them."""
    job.method.begin_layer(job.index, job.layer, job.adapter)
    if job.plan.remove_units:
        _remove_head_units(job)
    if job.plan.remove_channels:
        _remove_channels(job)
    _propagate_outputs(job)
    result = _finish_layer(job)
    job.method.end_layer(job.index, job.layer)
    return result


@contextmanager
def _layer_on(layer: nn.Module, index: int, device: torch.device, times: PhaseTimes, store):
    """The layer on `device` while it is pruned, handed back to `store` afterwards (time counted as `transfer`)."""
    t = time.perf_counter()
    store.fetch(index, layer, device)
    transfer = time.perf_counter() - t
    try:
        yield layer
    finally:
        t = time.perf_counter()
        store.release(index, layer)
        times.extra["transfer"] = round(times.extra.get("transfer", 0.0) + transfer + time.perf_counter() - t, 4)


@torch.no_grad()
def prune_layers(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, plans: list[LayerPlan],
                 method: PruningMethod, device: torch.device, batch_size: int = 8, progress: bool = True,
                 stats_dtype: torch.dtype = torch.float32, times: PhaseTimes | None = None,
                 replay_attention: bool = True, data_parallel: DataParallel | None = None,
                 store=None, correct_drift: bool = False) -> list[LayerResult]:
    """Prune every decoder layer in place according to `plans`; returns one `LayerResult` per layer.

    `replay_attention=False` recomputes attention in passes (2) and (3) instead of replaying the stored
    `o_proj` inputs (same result up to rounding, slower; kept to check the replay).

    Under `data_parallel`, `input_ids` is this rank's share of the sequences: statistics are summed over the
    ranks before each decision, rank 0's decisions are applied everywhere, and each rank propagates only its
    own sequences to the next layer.

    `store` (default `ResidentLayers()`) brings each layer onto `device` before its turn and takes it back after
    (`slimflow.streaming` reads it from the checkpoint and writes it out).

    `correct_drift=True` also carries the dense model's hidden states through the layers and has each pruned
    projection start from its refit to the dense model's outputs (`refit_to_dense`), so every layer undoes
    part of the error that the layers before it introduced, instead of only preserving its own outputs."""
    times = times or PhaseTimes()
    store = store or ResidentLayers()
    layers = adapter.layers(model)
    with _timed(times, "capture", device):
        inputs = capture_layer_inputs(model, adapter, input_ids, batch_size, device)
        if correct_drift:
            inputs.dense = inputs.hidden.clone()
    settings = dict(method=method, batch_size=batch_size, device=device, stats_dtype=stats_dtype, times=times,
                    replay_attention=replay_attention, data_parallel=data_parallel or DataParallel.local(),
                    correct_drift=correct_drift)
    results = []
    bar = tqdm(total=len(layers), desc="pruning layers", unit="layer", disable=not progress)
    for index, (layer, plan) in enumerate(zip(layers, plans)):
        with _layer_on(layer, index, device, times, store):
            job = _start_layer(model, adapter, inputs, index, layer, plan, index == len(layers) - 1, settings)
            results.append(_prune_layer(job))
        bar.set_postfix(heads=job.result.widths.num_attention_heads, channels=job.result.widths.intermediate_size)
        bar.update()
    bar.close()
    return results


@dataclass
class _GlobalState:
    """What the shots of `prune_global` share: per layer its result so far and the original indices still kept."""

    results: list[LayerResult]
    kept_units: list[list[int]]
    kept_channels: list[list[int]]
    floors: list[tuple[int, int]]

    def limits(self) -> list[tuple[int, int]]:
        """Per layer: how many head units and channels it may still lose."""
        return [(len(u) - fu, len(c) - fc) for u, c, (fu, fc) in zip(self.kept_units, self.kept_channels, self.floors)]


def _start_global(model: nn.Module, adapter: ModelAdapter, max_layer_ratio: float) -> _GlobalState:
    results, kept_units, kept_channels = [], [], []
    for index, layer in enumerate(adapter.layers(model)):
        heads, kv = adapter.layer_heads(model, layer)
        channels = adapter.layer_intermediate(layer)
        kept_units.append(list(range(kv)))
        kept_channels.append(list(range(channels)))
        results.append(LayerResult(index, 0.0, heads, list(range(kv)), channels, list(range(channels)),
                                   surgery.LayerWidths(heads, kv, channels)))
    floors = [(max(1, math.ceil(len(u) * (1 - max_layer_ratio))), max(1, math.ceil(len(c) * (1 - max_layer_ratio))))
              for u, c in zip(kept_units, kept_channels)]
    return _GlobalState(results, kept_units, kept_channels, floors)


def _apply_shot(model: nn.Module, adapter: ModelAdapter, state: _GlobalState, decisions: dict) -> None:
    """Write a shot's compensated weights and delete its units; indices are of the current (shrunk) layer."""
    layers = adapter.layers(model)
    head_dim = adapter.head_dim(model)
    for index, (heads_d, chans_d) in decisions.items():
        layer, result = layers[index], state.results[index]
        if heads_d is not None:
            _set_weight(adapter.o_proj(layer), heads_d.weight, heads_d.bias)
            drop = set(heads_d.removed)
            keep = [u for u in range(len(state.kept_units[index])) if u not in drop]
            surgery.prune_heads(adapter, layer, head_dim, keep)
            state.kept_units[index] = [state.kept_units[index][u] for u in keep]
            result.attn_error += heads_d.cost or 0.0
        if chans_d is not None:
            _set_weight(adapter.down_proj(layer), chans_d.weight, chans_d.bias)
            drop = set(chans_d.removed)
            keep = [c for c in range(len(state.kept_channels[index])) if c not in drop]
            surgery.prune_channels(adapter, layer, keep)
            state.kept_channels[index] = [state.kept_channels[index][c] for c in keep]
            result.ffn_error += chans_d.cost or 0.0


def _finish_global(model: nn.Module, adapter: ModelAdapter, state: _GlobalState) -> list[LayerResult]:
    for index, (layer, result) in enumerate(zip(adapter.layers(model), state.results)):
        heads_now, kv_now = adapter.layer_heads(model, layer)
        result.kept_units, result.kept_channels = state.kept_units[index], state.kept_channels[index]
        result.widths = surgery.LayerWidths(heads_now, kv_now, adapter.layer_intermediate(layer))
        # the mean of the removed head and channel shares (the method sets them independently)
        result.ratio = 1 - (heads_now / result.heads_before + result.widths.intermediate_size / result.channels_before) / 2
    return state.results


def prune_global(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, shot, shots: int,
                 target_params: float, device: torch.device, progress: bool = True,
                 max_layer_ratio: float = 0.9, times: PhaseTimes | None = None,
                 data_parallel: DataParallel | None = None) -> list[LayerResult]:
    """Multi-shot whole-model pruning (e.g. LLM Surgeon, through its `run` hook and `Engine.prune_in_shots`).

    Shot t of `shots` asks `shot(model, adapter, input_ids, remove_params, device, limits)` for decisions
    (`{layer: (head Decision | None, channel Decision | None)}`) that bring the removed parameters to
    `t/T·target_params`, writes the compensated weights and deletes the units, so the next shot sees the
    smaller model. No layer loses more than `max_layer_ratio` of its heads or channels. The whole model is moved
    to `device`. `input_ids` holds all calibration sequences; under `data_parallel` the method shards them
    itself, and rank 0's decisions are applied on every rank.
    """
    times = times or PhaseTimes()
    dp = data_parallel or DataParallel.local()
    layers = adapter.layers(model)
    home = next(model.parameters()).device
    model.to(device)
    start_params = surgery.count_parameters(model)
    state = _start_global(model, adapter, max_layer_ratio)
    try:
        for step in tqdm(range(1, shots + 1), desc="pruning shots", unit="shot", disable=not progress):
            todo = target_params * step / shots - (start_params - surgery.count_parameters(model))
            if todo <= 0:
                continue
            t = time.perf_counter()
            decisions = shot(model, adapter, input_ids, todo, device, state.limits())
            decisions = dp.broadcast_decisions(decisions, lambda i, kind: (
                adapter.o_proj(layers[i]) if kind == 0 else adapter.down_proj(layers[i])).weight)
            _sync(device)
            times.statistics += time.perf_counter() - t
            t = time.perf_counter()
            _apply_shot(model, adapter, state, decisions)
            times.surgery += time.perf_counter() - t
    finally:
        model.to(home)
    return _finish_global(model, adapter, state)


@dataclass
class Engine:
    """The `PruneEngine` a method's `run` hook drives: the layer-wise pass over its widths, or pruning in shots.

    `calibration` holds all sequences, `shard` this rank's share (the same tensor without data parallelism)."""

    model: nn.Module
    adapter: ModelAdapter
    method: PruningMethod
    calibration: torch.Tensor
    shard: torch.Tensor
    target_params: float
    device: torch.device
    batch_size: int = 8
    progress: bool = True
    times: PhaseTimes = field(default_factory=PhaseTimes)
    replay_attention: bool = True
    data_parallel: DataParallel = field(default_factory=DataParallel.local)
    store: object = None
    max_layer_ratio: float | None = None  # the caller's cap, which overrides a method's own
    correct_drift: bool = False

    def prune_layers(self, plans: list[LayerPlan]) -> list[LayerResult]:
        return prune_layers(self.model, self.adapter, self.shard, plans, self.method, self.device, self.batch_size,
                            self.progress, times=self.times, replay_attention=self.replay_attention,
                            data_parallel=self.data_parallel, store=self.store, correct_drift=self.correct_drift)

    def prune_in_shots(self, shots: int, shot, max_layer_ratio: float) -> list[LayerResult]:
        if self.correct_drift:  # the refit belongs to the layer-wise pass; shots would silently ignore it
            raise InvalidValueError(f"correct_drift applies to layer-wise methods; {self.method.name} prunes the "
                                    "whole model in shots: leave correct_drift off")
        return prune_global(self.model, self.adapter, self.calibration, shot, shots, self.target_params, self.device,
                            self.progress, self.max_layer_ratio or max_layer_ratio, self.times, self.data_parallel)
