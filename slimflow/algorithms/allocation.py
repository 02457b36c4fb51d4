"""Width allocation from measured costs: OBS cost curves of each layer's removals and a budget solver.

A cost curve gives, for one layer and one kind (head units or FFN channels), the calibration error of removing
the n cheapest units for n on a grid (0, step, 2·step, ...), measured by the same greedy OBS removal that
SlimGPT runs. `solve_budget` then picks one point per curve so that the removed parameters meet a target at
the least summed cost: a global threshold on cost per removed parameter over the lower convex hulls of all
curves (the Lagrangian solution, exact where the curves are convex), then a trim of the overshoot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimflow.algorithms.obs import check_cholesky, remove_and_downdate
from slimflow.algorithms.slimgpt import _head_scores


@dataclass
class CostCurve:
    """`costs[i]` is the cost of removing `counts[i]` units of `unit_params` parameters each (counts[0] = 0)."""

    counts: list[int]
    costs: list[float]
    unit_params: int

    def params(self, i: int) -> int:
        return self.counts[i] * self.unit_params


@torch.no_grad()
def head_cost_curve(weight: torch.Tensor, hinv: torch.Tensor, unit_size: int, max_remove: int,
                    exact: bool = False) -> list[float]:
    """Summed OBS error after each of `max_remove` greedy head-unit removals (SlimGPT's order); index 0 is 0."""
    n_units = weight.shape[1] // unit_size
    if not 0 <= max_remove < n_units:
        raise ValueError(f"cannot remove {max_remove} of {n_units} head units (at least one must stay)")
    alive = torch.ones(n_units, dtype=torch.bool, device=weight.device)
    offsets = torch.arange(unit_size, device=weight.device)
    errors, total = [weight.new_zeros(())], weight.new_zeros(())
    info = torch.zeros((), dtype=torch.int32, device=weight.device)
    for _ in range(max_remove):
        scores, bad = _head_scores(weight, hinv, unit_size, exact=exact)
        unit = torch.argmin(scores.masked_fill(~alive, float("inf")))
        weight, err, hinv, bad_m = remove_and_downdate(weight, hinv, unit * unit_size + offsets)
        alive[unit] = False
        total = total + err
        errors.append(total)
        info = info | bad.abs().amax() | bad_m.abs()
    check_cholesky(info)
    return torch.stack(errors).tolist()


@torch.no_grad()
def channel_cost_curve(weight: torch.Tensor, hinv: torch.Tensor, counts: list[int]) -> list[float]:
    """Summed OBS error after removing `counts[i]` channels (ascending, from 0): each step drops the channels of
    smallest single-column error `½‖W[:, j]‖² / G_jj` jointly and downdates G (SlimGPT's channel step)."""
    if counts[0] != 0 or any(b <= a for a, b in zip(counts, counts[1:])) or counts[-1] >= weight.shape[1]:
        raise ValueError("counts must rise strictly from 0 and leave at least one channel")
    alive = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    errors, total = [weight.new_zeros(())], weight.new_zeros(())
    info = torch.zeros((), dtype=torch.int32, device=weight.device)
    for a, b in zip(counts, counts[1:]):
        scores = 0.5 * weight.pow(2).sum(0) / torch.diagonal(hinv)
        scores.masked_fill_(~alive, float("inf"))
        cols = torch.topk(scores, b - a, largest=False).indices.sort().values
        weight, err, hinv, bad = remove_and_downdate(weight, hinv, cols)
        alive[cols] = False
        total = total + err
        errors.append(total)
        info = info | bad.abs()
    check_cholesky(info)
    return torch.stack(errors).tolist()


def channel_grid(channels: int, max_remove: int, multiple: int = 1, points: int = 64) -> list[int]:
    """Up to `points + 1` removal counts from 0 to `max_remove`, keeping `channels − count` a multiple of `multiple`
    (the last count is the largest such one ≤ `max_remove`)."""
    top = max_remove - (max_remove - channels) % multiple
    if top <= 0:
        return [0]
    first = channels % multiple  # the smallest positive removal that leaves a multiple (or one whole step)
    first = first or multiple
    if first > top:
        return [0]
    steps = (top - first) // multiple
    stride = max(1, math.ceil(steps / max(points - 1, 1)))
    counts = [0] + [first + multiple * k for k in range(0, steps + 1, stride)]
    if counts[-1] != top:
        counts.append(top)
    return counts


def _lower_hull(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (Andrew's monotone chain, lower half)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a → i
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def solve_budget(curves: list[CostCurve], target: float, at_least: bool = True) -> list[int]:
    """Index of the chosen point of every curve: removed parameters ≥ `target` at (near-)least summed cost
    (`at_least=False`: as close to `target` as possible, on either side, after the same steps).

    1. Every curve's lower convex hull is cut into segments; all segments are taken in order of cost per
       removed parameter (one global threshold) until the target is met. With convex curves this is optimal at
       every hull breakpoint.
    2. On the curve whose segment crossed the target, the cheapest intermediate point that still meets the
       target replaces the segment's end.
    3. While some curve can step back one point and the target stays met, the step saving the most cost per
       parameter is undone (trims the overshoot to less than one grid step).
    4. Exchanges: one curve one point forward, another one point back (or none), applied while the best such
       move lowers the cost and keeps the target met; then step 3 again.
    Raises `ValueError` if even the last point of every curve does not reach the target.
    """
    if sum(c.params(len(c.counts) - 1) for c in curves) < target:
        raise ValueError("the cost curves cannot reach the target")
    chosen = [0] * len(curves)
    removed = 0
    if target <= 0:
        return chosen
    segments = []
    for j, c in enumerate(curves):
        xs = [float(c.params(i)) for i in range(len(c.counts))]
        hull = _lower_hull(xs, c.costs)
        for a, b in zip(hull, hull[1:]):
            segments.append(((c.costs[b] - c.costs[a]) / (xs[b] - xs[a]), j, a, b))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    crossing = None
    for _, j, a, b in segments:
        if chosen[j] != a:  # hull segments of one curve arrive in order; this cannot happen for valid hulls
            continue
        chosen[j] = b
        removed += curves[j].params(b) - curves[j].params(a)
        if removed >= target:
            crossing = (j, a, b)
            break
    if crossing is not None:
        j, a, b = crossing
        c = curves[j]
        base = removed - c.params(b)
        options = [i for i in range(a + 1, b + 1) if base + c.params(i) >= target]
        best = min(options, key=lambda i: (c.costs[i], i))
        removed = base + c.params(best)
        chosen[j] = best
    removed = _trim(curves, chosen, removed, target)
    for _ in range(10 * sum(len(c.counts) for c in curves)):
        move = _best_exchange(curves, chosen, removed, target)
        if move is None:
            break
        up, down = move
        removed += curves[up].params(chosen[up] + 1) - curves[up].params(chosen[up])
        chosen[up] += 1
        if down is not None:
            removed -= curves[down].params(chosen[down]) - curves[down].params(chosen[down] - 1)
            chosen[down] -= 1
        removed = _trim(curves, chosen, removed, target)
    if not at_least:  # land as close to the target as one step back allows, on either side
        steps = [(c.costs[i] - c.costs[i - 1], j) for j, (c, i) in enumerate(zip(curves, chosen))
                 if i > 0 and abs(removed - (c.params(i) - c.params(i - 1)) - target) < abs(removed - target)]
        if steps:
            chosen[max(steps)[1]] -= 1
    return chosen


def _trim(curves, chosen, removed, target):
    while True:
        best, best_gain = None, -math.inf
        for j, c in enumerate(curves):
            i = chosen[j]
            if i == 0:
                continue
            dp = c.params(i) - c.params(i - 1)
            if removed - dp < target:
                continue
            gain = (c.costs[i] - c.costs[i - 1]) / dp
            if gain > best_gain:
                best, best_gain = j, gain
        if best is None:
            return removed
        c = curves[best]
        removed -= c.params(chosen[best]) - c.params(chosen[best] - 1)
        chosen[best] -= 1


def _best_exchange(curves, chosen, removed, target, tol=1e-12):
    ups = [(j, c.params(chosen[j] + 1) - c.params(chosen[j]), c.costs[chosen[j] + 1] - c.costs[chosen[j]])
           for j, c in enumerate(curves) if chosen[j] + 1 < len(c.counts)]
    downs = [(k, c.params(chosen[k]) - c.params(chosen[k] - 1), c.costs[chosen[k]] - c.costs[chosen[k] - 1])
             for k, c in enumerate(curves) if chosen[k] > 0]
    best, best_delta = None, -tol * (1 + sum(c.costs[i] for c, i in zip(curves, chosen)))
    for j, dp_up, dc_up in ups:
        for k, dp_down, dc_down in downs:
            if k != j and removed + dp_up - dp_down >= target and dc_up - dc_down < best_delta:
                best, best_delta = (j, k), dc_up - dc_down
    return best
