"""Shared helpers of the methods: moments from the input statistics, width plans, calibration passes, biases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimflow.algorithms.schedules import LayerPlan, ScheduleError


# ------------------------------------------------------------------------------------------------- moments
def second_moment(stats) -> torch.Tensor:
    """`Σ_t x xᵀ / N` over calibration tokens, from `H = (2/n) Σ_s X_s X_sᵀ` (n sequences, N tokens)."""
    return stats.hessian * (stats.num_sequences / (2.0 * max(stats.num_tokens, 1)))


def covariance(stats) -> torch.Tensor:
    """Token covariance of the inputs, `E[xxᵀ] − x̄x̄ᵀ`."""
    mean = stats.mean.to(stats.hessian.dtype)
    return second_moment(stats) - torch.outer(mean, mean)


def column_sq_norms(stats) -> torch.Tensor:
    """`‖X_j‖²` summed over all calibration tokens, per input feature."""
    return torch.diagonal(stats.hessian) * (stats.num_sequences / 2.0)


def unit_sum(scores: torch.Tensor, unit_size: int) -> torch.Tensor:
    return scores.reshape(-1, unit_size).sum(-1)


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


# ----------------------------------------------------------------------------------------------- plans
def refuse_schedule(method, schedule: str | None, alternative: str = "") -> None:
    """`resolve_schedule` of a method that allocates the per-layer widths itself: no schedule may be given."""
    if schedule is not None:
        raise ScheduleError(
            f"method {method.name!r} allocates per-layer widths itself, so schedule={schedule!r} cannot be "
            "combined with it: leave the schedule unset (CLI: omit --schedule)" + alternative
        )
    return None


def _removed(plans, shapes) -> int:
    return sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plans, shapes))


def plan_from_counts(units: list[int], channels: list[int], shapes) -> list[LayerPlan]:
    """Per-layer plans from removal counts; the recorded ratio is the removed share of the layer's parameters."""
    plans = []
    for u, c, s in zip(units, channels, shapes):
        if u >= s.head_units or c >= s.channels:
            raise ScheduleError("a width allocation would remove every head or channel of a layer: lower the ratio")
        plans.append(LayerPlan((u * s.unit_params + c * s.channel_params) / s.prunable, u, c))
    return plans


def plan_from_shape(shape: list[float], budget, cap: float = 0.95) -> list[LayerPlan]:
    """Ratios `min(cap, scale·shape_l)`, with `scale` found by bisection so the realised (rounded) parameter
    count meets `budget.target_params`; layers beyond the cap give their share to the others."""
    shapes, mult = budget.shapes, budget.channel_multiple
    cap = min(cap, budget.max_layer_ratio or cap)

    def counts(scale):
        units, chans = [], []
        for f, s in zip(shape, shapes):
            r = min(cap, scale * f)
            units.append(min(s.head_units - 1, round(s.head_units * r)))
            keep = max(mult, mult * round((s.channels - s.channels * r) / mult))
            chans.append(min(s.channels - 1, s.channels - min(keep, s.channels)))
        return units, chans

    lo, hi = 0.0, 1.0
    while _removed(plan_from_counts(*counts(hi), shapes), shapes) < budget.target_params and hi < 1e6:
        hi *= 2
    if hi >= 1e6:
        raise ScheduleError(f"the allocation cannot remove {budget.target_params:,.0f} parameters with a per-layer "
                            f"cap of {cap}: lower the ratio or raise max_layer_ratio")
    for _ in range(60):
        mid = (lo + hi) / 2
        if _removed(plan_from_counts(*counts(mid), shapes), shapes) < budget.target_params:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda x: abs(_removed(plan_from_counts(*counts(x), shapes), shapes) - budget.target_params))
    return plan_from_counts(*counts(best), shapes)


# ------------------------------------------------------------------------------------------ model passes
@torch.no_grad()
def forward_passes(model: nn.Module, calibration: torch.Tensor, batch_size: int, device) -> None:
    """Run the whole model over the calibration sequences (statistics are collected by hooks)."""
    for start in range(0, calibration.shape[0], batch_size):
        model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)


def lm_backward_passes(model: nn.Module, calibration: torch.Tensor, batch_size: int, device,
                       weights: list[nn.Parameter] | None = None) -> float:
    """Forward + backward of the summed next-token loss, one micro-batch at a time; returns the mean token NLL.

    Only `weights` get `.grad` (accumulated over all micro-batches); with none, gradients flow through the
    activations only (for output-gradient hooks). Parameter `requires_grad` flags are restored afterwards.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in weights or []:
        p.requires_grad_(True)
        p.grad = None
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)) if not weights else None
    total, count = 0.0, 0
    try:
        with torch.enable_grad():
            for start in range(0, calibration.shape[0], batch_size):
                batch = calibration[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
                loss.backward()
                total += float(loss.detach())
                count += batch[:, 1:].numel()
                del logits, loss
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------ biases
def softmax_shape(scores: list[float], alpha: float, active: int) -> list[float]:
    """`K·softmax(α s)` over the `active` layers with the largest `s`, zero elsewhere."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:active]
    z = [math.exp(alpha * scores[i]) for i in order]
    total = sum(z)
    out = [0.0] * len(scores)
    for i, v in zip(order, z):
        out[i] = active * v / total
    return out
