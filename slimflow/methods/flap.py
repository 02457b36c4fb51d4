"""FLAP: fluctuation-based scores, one global ranking across layers (adaptive widths), bias compensation.

Column score `s_j = Var_tokens(X_j)·‖W[:, j]‖²` on `o_proj` / `down_proj` inputs (the attention scores are
squared again). Scores are z-normalised per layer and module; a head unit scores the mean z of its columns.
All units of the dense model are ranked together, a unit weighing its parameter count, and the lowest go until
the parameter budget is met. Removed columns are replaced by the bias `W[:, M]·x̄_M`, their mean contribution.
"""

from __future__ import annotations

import torch

from slimflow.algorithms.hessian import HessianAccumulator
from slimflow import method_options
from slimflow.methods.base import Decision, PruningMethod, register, unit_columns, zero_columns
from slimflow.methods.common import forward_passes, plan_from_counts, refuse_schedule, second_moment


def fluctuation_scores(weight: torch.Tensor, stats) -> torch.Tensor:
    """`Var_tokens(X_j) · ‖W[:, j]‖²` per input column."""
    mean = stats.mean.to(weight.dtype)
    var = torch.diagonal(second_moment(stats)).to(weight.dtype) - mean**2
    return var.clamp_min(0) * weight.pow(2).sum(0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def head_metric(weight: torch.Tensor, stats, unit_size: int) -> torch.Tensor:
    """Mean z-score (over its columns) of each head unit, from the squared fluctuation scores."""
    return standardise(fluctuation_scores(weight, stats) ** 2).reshape(-1, unit_size).mean(-1)


def channel_metric(weight: torch.Tensor, stats) -> torch.Tensor:
    return standardise(fluctuation_scores(weight, stats))


def bias_compensation(weight: torch.Tensor, stats, cols: list[int]) -> torch.Tensor:
    """`W[:, M]·x̄_M`: the mean output of the removed columns, kept as a bias."""
    return weight[:, cols] @ stats.mean.to(weight.dtype)[cols]


def global_allocation(head_scores: list[torch.Tensor], channel_scores: list[torch.Tensor], shapes, target: float):
    """Remove the lowest-scoring units across all layers until `target` parameters are gone (≥ 1 unit stays).

    Returns the removed head units and channels of every layer."""
    entries = []
    for i, (h, c) in enumerate(zip(head_scores, channel_scores)):
        entries += [(float(v), i, 0, j) for j, v in enumerate(h.tolist())]
        entries += [(float(v), i, 1, j) for j, v in enumerate(c.tolist())]
    entries.sort(key=lambda e: e[0])
    heads = [[] for _ in shapes]
    chans = [[] for _ in shapes]
    removed = 0.0
    for _, i, kind, j in entries:
        if removed >= target:
            break
        s = shapes[i]
        size = s.unit_params if kind == 0 else s.channel_params
        if removed + size / 2 > target:  # closest count: skip units that overshoot by more than half
            continue
        pool, limit = (heads[i], s.head_units) if kind == 0 else (chans[i], s.channels)
        if len(pool) + 1 >= limit:
            continue
        pool.append(j)
        removed += size
    return [sorted(h) for h in heads], [sorted(c) for c in chans]


@register
class FLAP(PruningMethod):
    """Fluctuation-based adaptive structured pruning; options: `slimflow.method_options.flap`."""

    name = "flap"
    Options = method_options.flap

    def __init__(self, options: method_options.flap | None = None, **values):
        super().__init__(options, **values)
        self._heads: list[list[int]] = []
        self._channels: list[list[int]] = []
        self._index = 0

    def resolve_schedule(self, schedule):
        return refuse_schedule(self, schedule)

    def prepare_model(self, model, adapter):
        if self.options.bias:
            adapter.add_output_biases(model)

    def streamable(self) -> bool:
        return False  # statistics of the whole dense model

    @torch.no_grad()
    def prepare(self, model, adapter, calibration, budget, device, batch_size):
        layers = adapter.layers(model)
        stats, handles = [], []
        for layer in layers:
            o = adapter.o_proj(layer)
            down = adapter.down_proj(layer)
            pair = (HessianAccumulator(o.in_features, device), HessianAccumulator(down.in_features, device))
            stats.append(pair)
            handles += [o.register_forward_pre_hook(lambda m, a, acc=pair[0]: acc.add(a[0])),
                        down.register_forward_pre_hook(lambda m, a, acc=pair[1]: acc.add(a[0]))]
        try:
            forward_passes(model, calibration, batch_size, device)
        finally:
            for h in handles:
                h.remove()
        for pair in stats:
            for acc in pair:
                self.data_parallel.reduce_hessian(acc)
        head_scores, channel_scores = [], []
        for layer, shape, (so, sd) in zip(layers, budget.shapes, stats):
            o = adapter.o_proj(layer).weight.float()
            down = adapter.down_proj(layer).weight.float()
            head_scores.append(head_metric(o, so, o.shape[1] // shape.head_units))
            channel_scores.append(channel_metric(down, sd))
        self._heads, self._channels = global_allocation(head_scores, channel_scores, budget.shapes, budget.target_params)

    def allocate(self, budget, schedule_plan):
        return plan_from_counts([len(h) for h in self._heads], [len(c) for c in self._channels], budget.shapes)

    def begin_layer(self, index, layer, adapter):
        self._index = index

    def _decide(self, weight, stats, removed, cols):
        bias = bias_compensation(weight, stats, cols) if self.options.bias and cols else None
        return Decision(removed, zero_columns(weight, cols), bias=bias)

    def prune_heads(self, weight, stats, unit_size, n_remove):
        removed = self._heads[self._index]
        assert len(removed) == n_remove
        return self._decide(weight, stats, removed, unit_columns(removed, unit_size))

    def prune_channels(self, weight, stats, n_remove):
        removed = self._channels[self._index]
        assert len(removed) == n_remove
        return self._decide(weight, stats, removed, removed)
