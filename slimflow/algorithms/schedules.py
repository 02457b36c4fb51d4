"""Per-layer pruning ratios, solved so that a requested fraction of the model's parameters is removed.

A schedule gives each layer a shape `f_i ∈ [0, 1]`; the ratio of layer i is `r_i = r_min + (r_max − r_min)·f_i`
with `r_max = spread·r_min` (or a cap). Heads and channels of a layer share `r_i`. Every layer keeps a floor
(one head unit, 1/64 of its FFN channels); what a layer cannot give goes to the others. The `adaptive` schedule
(`slimflow.allocation`) chooses widths from measured costs instead and uses the same floors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimflow.errors import SlimflowUserError

SCHEDULES = ("uniform", "linear", "log_increase")
ADAPTIVE = "adaptive"  # widths from measured costs: slimflow.allocation


class ScheduleError(SlimflowUserError, ValueError):
    pass


def schedule_shape(schedule: str, num_layers: int) -> list[float]:
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join((ADAPTIVE, *SCHEDULES))}")
    if schedule == "uniform" or num_layers == 1:
        return [0.0] * num_layers
    if schedule == "linear":
        return [i / (num_layers - 1) for i in range(num_layers)]
    return [math.log(1 + i) / math.log(num_layers) for i in range(num_layers)]


def layer_ratios(
    schedule: str,
    mean_ratio: float,
    weights: list[float],
    spread: float = 4.0,
    max_ratio: float | None = None,
) -> list[float]:
    """Ratios whose `weights`-weighted mean is `mean_ratio` (weights = prunable parameters per layer).

    `log_increase` with the default spread 4 reproduces SlimGPT's Incremental Pruning Ratio for the real
    layer count (0.0625 → 0.25 for LLaMA-7B at 20% of the decoder). `max_ratio` caps the last layers.
    """
    f = schedule_shape(schedule, len(weights))
    if schedule == "uniform" or len(weights) == 1:
        return [mean_ratio] * len(weights)
    fbar = sum(w * x for w, x in zip(weights, f)) / sum(weights)
    r_min = mean_ratio / (1 + (spread - 1) * fbar)
    r_max = spread * r_min
    if max_ratio is not None and r_max > max_ratio:
        r_max = max_ratio
        r_min = (mean_ratio - max_ratio * fbar) / (1 - fbar)
    return [r_min + (r_max - r_min) * x for x in f]


@dataclass
class LayerShape:
    """Current widths of one layer and the parameters one unit of each kind carries."""

    head_units: int
    unit_params: int
    channels: int
    channel_params: int

    @property
    def prunable(self) -> int:
        return self.head_units * self.unit_params + self.channels * self.channel_params


@dataclass
class LayerPlan:
    ratio: float
    remove_units: int
    remove_channels: int


@dataclass
class Plan:
    layers: list[LayerPlan]
    target_fraction: float
    realised_fraction: float
    params_removed: int
    decoder_ratio: float


CHANNEL_FLOOR_FRACTION = 1 / 64


def layer_limits(shape: LayerShape, channel_multiple: int = 1, max_ratio: float | None = None) -> tuple[int, int]:
    """The most head units and FFN channels a layer may lose: it keeps at least one unit and at least
    `CHANNEL_FLOOR_FRACTION` of its channels (rounded up to `channel_multiple`), and with `max_ratio` at least
    `1 − max_ratio` of each kind."""
    keep_units = max(1, math.ceil(shape.head_units * (1 - max_ratio))) if max_ratio is not None else 1
    keep_ch = max(1, math.ceil(shape.channels * CHANNEL_FLOOR_FRACTION))
    if max_ratio is not None:
        keep_ch = max(keep_ch, math.ceil(shape.channels * (1 - max_ratio)))
    keep_ch = channel_multiple * math.ceil(keep_ch / channel_multiple)
    return max(0, shape.head_units - keep_units), max(0, shape.channels - min(keep_ch, shape.channels))


def max_removable(shapes: list[LayerShape], channel_multiple: int = 1, max_ratio: float | None = None) -> int:
    """Parameters the decoder can give up while every layer keeps its floor (`layer_limits`)."""
    total = 0
    for s in shapes:
        units, channels = layer_limits(s, channel_multiple, max_ratio)
        total += units * s.unit_params + channels * s.channel_params
    return total


def check_budget(shapes: list[LayerShape], fraction: float, reference_params: int, channel_multiple: int = 1,
                 max_ratio: float | None = None, already_removed: int = 0) -> float:
    """The number of parameters to remove, or a `ScheduleError` naming the fix when no schedule can do it."""
    if not 0 < fraction < 1:
        raise ScheduleError(f"ratio must be in (0, 1), got {fraction}: it is the fraction of parameters to remove")
    target = fraction * reference_params - already_removed
    if target <= 0:
        raise ScheduleError(
            f"the model already has {already_removed / reference_params:.1%} fewer parameters than the reference "
            f"({reference_params:,}); a ratio of {fraction} asks for no further pruning. Raise the ratio."
        )
    prunable = sum(s.prunable for s in shapes)
    if target >= prunable:
        raise ScheduleError(
            f"removing {fraction:.0%} of {reference_params:,} parameters needs {target:,.0f}, but the decoder "
            f"layers hold only {prunable:,} prunable parameters (embeddings and lm_head are never pruned). "
            "Lower the ratio."
        )
    most = max_removable(shapes, channel_multiple, max_ratio)
    if target > most:
        best = (already_removed + most) / reference_params
        floor = f" and at most max_layer_ratio={max_ratio} of each kind" if max_ratio is not None else ""
        raise ScheduleError(
            f"removing {fraction:.0%} of {reference_params:,} parameters needs {target:,.0f}, but with every layer "
            f"keeping one head unit and {CHANNEL_FLOOR_FRACTION:.1%} of its FFN channels{floor} at most "
            f"{most:,} can go ({best:.1%} of the model). Lower the ratio to at most {math.floor(best * 1000) / 1000}."
        )
    return target


def _counts(ratios, shapes, channel_multiple, limits):
    plans = []
    for r, s, (max_units, max_ch) in zip(ratios, shapes, limits):
        r = min(max(0.0, r), 1.0)
        units = round(s.head_units * r)
        keep_ch = max(channel_multiple, channel_multiple * round((s.channels - s.channels * r) / channel_multiple))
        channels = s.channels - min(keep_ch, s.channels)
        if units > max_units or channels > max_ch:  # at the floor: record the share the layer really gives
            units, channels = min(units, max_units), min(channels, max_ch)
            r = (units * s.unit_params + channels * s.channel_params) / s.prunable
        plans.append(LayerPlan(r, units, channels))
    return plans


def _absorb_rounding(plans, shapes, limits, channel_multiple, residual) -> int:
    """Shift FFN channels by whole `channel_multiple` steps, spread evenly over the layers, until the removed
    count is within half a step of the target (head units are coarse: with few KV groups one rounding step
    of a shared ratio moves several percent of the model). Returns the new removed count."""
    while True:
        movable = []
        for i, (p, s, (_, max_ch)) in enumerate(zip(plans, shapes, limits)):
            step = channel_multiple * s.channel_params
            if (residual > 0 and p.remove_channels + channel_multiple <= max_ch) or (
                    residual < 0 and p.remove_channels >= channel_multiple):
                movable.append((i, step))
        if not movable:
            break
        step = max(st for _, st in movable)
        if abs(residual) <= step / 2:
            break
        per_layer = max(1, int(abs(residual) // (step * len(movable))))
        for i, st in movable:
            if abs(residual) <= st / 2:
                break
            p, s, (_, max_ch) = plans[i], shapes[i], limits[i]
            sign = 1 if residual > 0 else -1
            room = (max_ch - p.remove_channels if sign > 0 else p.remove_channels) // channel_multiple
            n = min(per_layer, room, max(1, int(abs(residual) // st)))
            p.remove_channels += sign * n * channel_multiple
            residual -= sign * n * st
            p.ratio = (p.remove_units * s.unit_params + p.remove_channels * s.channel_params) / s.prunable
    return sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plans, shapes))


def plan_layers(
    shapes: list[LayerShape],
    fraction: float,
    reference_params: int,
    schedule: str = "log_increase",
    spread: float = 4.0,
    max_ratio: float | None = None,
    channel_multiple: int = 1,
    already_removed: int = 0,
) -> Plan:
    """Per-layer unit/channel counts removing `fraction·reference_params` parameters as closely as rounding allows.

    The mean decoder ratio is found by bisection on the realised (rounded) count, so the realised fraction of
    the reference model's total parameters lands within a rounding step of the target. Every layer keeps its
    floor (`layer_limits`: one head unit, 1/64 of the channels); what a layer cannot give, the bisection moves
    to the others. `already_removed` counts parameters an earlier stage took from the reference model
    (iterative recipes). A target beyond what the floors allow fails here, before any calibration work.
    """
    target = check_budget(shapes, fraction, reference_params, channel_multiple, max_ratio, already_removed)
    weights = [float(s.prunable) for s in shapes]
    limits = [layer_limits(s, channel_multiple, max_ratio) for s in shapes]

    def realised(mean_ratio):
        ratios = layer_ratios(schedule, mean_ratio, weights, spread, max_ratio)
        plans = _counts(ratios, shapes, channel_multiple, limits)
        removed = sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plans, shapes))
        return removed, plans

    lo, hi = 0.0, 1.0
    while realised(hi)[0] < target:
        hi *= 2
        if hi > 1e9:  # unreachable: check_budget guarantees the fully clamped plan meets the target
            raise ScheduleError(f"the {schedule} schedule cannot reach ratio {fraction}")
    for _ in range(80):
        mid = (lo + hi) / 2
        if realised(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    (r_lo, p_lo), (r_hi, p_hi) = realised(lo), realised(hi)
    mean_ratio, removed, plans = (lo, r_lo, p_lo) if abs(r_lo - target) <= abs(r_hi - target) else (hi, r_hi, p_hi)
    removed = _absorb_rounding(plans, shapes, limits, channel_multiple, target - removed)
    return Plan(plans, fraction, (already_removed + removed) / reference_params, removed, min(mean_ratio, 1.0))
