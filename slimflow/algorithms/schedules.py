"""Per-layer pruning ratios, solved so that a requested fraction of the model's parameters is removed.

A schedule gives each layer a shape `f_i ∈ [0, 1]`; the ratio of layer i is `r_i = r_min + (r_max − r_min)·f_i`
with `r_max = spread·r_min` (or a cap). Heads and channels of a layer share `r_i`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("uniform", "linear", "log_increase")


class ScheduleError(ValueError):
    pass


def schedule_shape(schedule: str, num_layers: int) -> list[float]:
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
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


def _counts(ratios, shapes, channel_multiple):
    plans = []
    for r, s in zip(ratios, shapes):
        units = round(s.head_units * r)
        keep_ch = s.channels - s.channels * r
        keep_ch = max(channel_multiple, channel_multiple * round(keep_ch / channel_multiple))
        plans.append(LayerPlan(r, units, s.channels - min(keep_ch, s.channels)))
    return plans


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
    the reference model's total parameters lands within a rounding step of the target. `already_removed`
    counts parameters an earlier stage took from the reference model (iterative recipes).
    """
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
    weights = [float(s.prunable) for s in shapes]

    def realised(mean_ratio):
        ratios = layer_ratios(schedule, mean_ratio, weights, spread, max_ratio)
        plans = _counts(ratios, shapes, channel_multiple)
        removed = sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plans, shapes))
        return removed, plans

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if realised(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    (r_lo, p_lo), (r_hi, p_hi) = realised(lo), realised(hi)
    mean_ratio, removed, plans = (lo, r_lo, p_lo) if abs(r_lo - target) <= abs(r_hi - target) else (hi, r_hi, p_hi)
    for i, (p, s) in enumerate(zip(plans, shapes)):
        if p.ratio >= 1 or p.remove_units >= s.head_units or p.remove_channels >= s.channels:
            raise ScheduleError(
                f"the {schedule} schedule at ratio {fraction} would remove every head or channel of layer {i} "
                f"(layer ratio {p.ratio:.3f}). Lower the ratio, use schedule='uniform', a smaller spread, or "
                "set max_layer_ratio (e.g. 0.9)."
            )
        if p.ratio < 0:
            raise ScheduleError(f"the {schedule} schedule with max_layer_ratio={max_ratio} cannot reach ratio {fraction}")
    return Plan(plans, fraction, (already_removed + removed) / reference_params, removed, mean_ratio)
