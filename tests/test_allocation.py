"""Cost curves and the budget solver of the adaptive allocation, against direct computation and brute force."""

import itertools
import random

import pytest
import torch

from slimflow.algorithms.allocation import (
    CostCurve,
    channel_cost_curve,
    channel_grid,
    head_cost_curve,
    solve_budget,
)
from slimflow.algorithms.obs import downdate_inverse, obs_remove
from slimflow.algorithms.slimgpt import prune_head_units


def _problem(d_in=24, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d_in, dtype=torch.float64)
    h = 2 * x.t() @ x / 200 + 0.01 * torch.eye(d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return w, torch.linalg.inv(h)


@pytest.mark.parametrize("exact", [False, True])
def test_head_curve_is_the_greedy_error_of_every_count(exact):
    w, g = _problem()
    curve = head_cost_curve(w, g, unit_size=4, max_remove=5, exact=exact)
    assert curve[0] == 0
    for n in range(1, 6):
        _, _, _, err = prune_head_units(w, g, 4, n, exact=exact)
        assert curve[n] == pytest.approx(err, rel=1e-9)
    assert curve == sorted(curve)
    if exact:  # one removal: the exact greedy equals exhaustive search over units
        best = min(obs_remove(w, g, torch.arange(u * 4, u * 4 + 4))[1] for u in range(6))
        assert curve[1] == pytest.approx(best, rel=1e-9)


def test_channel_curve_matches_stepwise_obs_removal():
    w, g = _problem()
    counts = [0, 1, 4, 9]
    curve = channel_cost_curve(w, g, counts)
    weight, hinv, alive, total, expected = w.clone(), g.clone(), torch.ones(24, dtype=torch.bool), 0.0, [0.0]
    for a, b in zip(counts, counts[1:]):
        scores = 0.5 * weight.pow(2).sum(0) / torch.diagonal(hinv)
        scores[~alive] = float("inf")
        cols = torch.argsort(scores)[: b - a].sort().values
        weight, err = obs_remove(weight, hinv, cols)
        hinv = downdate_inverse(hinv, cols)
        alive[cols] = False
        total += err
        expected.append(total)
    assert curve == pytest.approx(expected, rel=1e-9)
    # one step of one channel is the exhaustive single-column optimum
    assert curve[1] == pytest.approx(min(obs_remove(w, g, torch.tensor([j]))[1] for j in range(24)), rel=1e-9)
    with pytest.raises(ValueError):
        channel_cost_curve(w, g, [0, 5, 5])


@pytest.mark.parametrize("channels,max_remove,multiple", [(1024, 1008, 1), (1024, 960, 64), (100, 90, 8), (96, 94, 1)])
def test_channel_grid_respects_the_multiple_and_the_floor(channels, max_remove, multiple):
    counts = channel_grid(channels, max_remove, multiple, points=16)
    assert counts[0] == 0 and counts == sorted(set(counts)) and len(counts) <= 18
    assert all((channels - c) % multiple == 0 for c in counts[1:])
    assert counts[-1] <= max_remove and max_remove - counts[-1] < multiple


def _brute_force(curves, target):
    best = None
    for combo in itertools.product(*[range(len(c.counts)) for c in curves]):
        removed = sum(c.params(i) for c, i in zip(curves, combo))
        if removed >= target:
            cost = sum(c.costs[i] for c, i in zip(curves, combo))
            best = cost if best is None else min(best, cost)
    return best


def _random_curves(rng, convex, equal_params, n_curves=3):
    curves = []
    for _ in range(n_curves):
        n = rng.randint(2, 5)
        steps = sorted(rng.uniform(0.1, 3.0) for _ in range(n)) if convex else [rng.uniform(0.0, 3.0) for _ in range(n)]
        costs = [0.0]
        for s in steps:
            costs.append(costs[-1] + s)
        curves.append(CostCurve(list(range(n + 1)), costs, 1 if equal_params else rng.choice([1, 3, 7])))
    return curves


def _cost(curves, chosen):
    return sum(c.costs[i] for c, i in zip(curves, chosen))


def _removed(curves, chosen):
    return sum(c.params(i) for c, i in zip(curves, chosen))


def test_solver_is_optimal_for_convex_curves_of_equal_units():
    rng = random.Random(0)
    for _ in range(200):
        curves = _random_curves(rng, convex=True, equal_params=True)
        total = _removed(curves, [len(c.counts) - 1 for c in curves])
        target = rng.randint(1, total)
        chosen = solve_budget(curves, target)
        assert _removed(curves, chosen) == target
        assert _cost(curves, chosen) == pytest.approx(_brute_force(curves, target))


def test_solver_meets_the_target_within_the_lagrangian_bound_on_any_curves():
    """Mixed unit sizes make it a knapsack: the threshold prefix is optimal for its own budget, so the result
    costs at most the optimum plus one curve's cost; on these coarse cases it is the optimum in most draws."""
    rng = random.Random(1)
    exact = 0
    for _ in range(300):
        curves = _random_curves(rng, convex=rng.random() < 0.5, equal_params=False, n_curves=rng.randint(1, 4))
        total = _removed(curves, [len(c.counts) - 1 for c in curves])
        target = rng.uniform(0.5, total)
        chosen = solve_budget(curves, target)
        removed = _removed(curves, chosen)
        assert removed >= target
        # the trim leaves no curve that could step back and still meet the target
        assert all(removed - (c.params(i) - c.params(i - 1)) < target for c, i in zip(curves, chosen) if i > 0)
        optimum = _brute_force(curves, target)
        assert _cost(curves, chosen) <= optimum + max(c.costs[-1] for c in curves) + 1e-9
        exact += _cost(curves, chosen) <= optimum + 1e-9
    assert exact >= 270


def test_solver_refuses_an_unreachable_target():
    curves = [CostCurve([0, 1, 2], [0.0, 1.0, 3.0], 5)]
    with pytest.raises(ValueError):
        solve_budget(curves, 11)
    assert solve_budget(curves, 10) == [2]
