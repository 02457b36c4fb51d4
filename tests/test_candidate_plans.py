"""Candidate families of the adaptive search beyond the cost plans and fixed shapes: a fixed shape's per-layer
budget split between heads and channels by measured costs (`split`), and the mean of a cost plan and a fixed
shape (`blend`)."""

import itertools
import random

import numpy
import pytest
import torch

import slimflow
from slimflow.algorithms.allocation import CostCurve
from slimflow.algorithms.schedules import LayerPlan, LayerShape, ScheduleError, layer_limits
from slimflow.allocation import (blend_plans, candidate_plans, check_schedule_options, flat_channel_plan,
                                 split_within_layers)
from tests.tiny_models import tiny_model


def _random_layer(rng, multiple=1):
    shape = LayerShape(head_units=rng.randint(3, 6), unit_params=rng.choice([40, 64]),
                       channels=rng.randint(10, 24), channel_params=rng.choice([3, 5]))
    max_units, max_channels = layer_limits(shape, multiple)
    heads = CostCurve(list(range(max_units + 1)), [0.0], shape.unit_params)
    for _ in range(max_units):
        heads.costs.append(heads.costs[-1] + rng.random())
    grid = list(range(0, max_channels + 1, 2)) + ([max_channels] if max_channels % 2 else [])
    channels = CostCurve(grid, [0.0], shape.channel_params)
    for _ in grid[1:]:
        channels.costs.append(channels.costs[-1] + rng.random())
    return shape, heads, channels


def _interp(curve, n):
    return float(numpy.interp(n, curve.counts, curve.costs))


@pytest.mark.parametrize("seed", range(6))
def test_split_keeps_each_layers_budget_and_takes_the_cheapest_exact_pair(seed):
    rng = random.Random(seed)
    layers = [_random_layer(rng) for _ in range(3)]
    shapes = [s for s, _, _ in layers]
    scales = [(rng.uniform(0.5, 2), rng.uniform(0.5, 2)) for _ in layers]
    fixed = []
    for s in shapes:  # a feasible budget: some heads and some channels
        mu, mc = layer_limits(s)
        fixed.append(LayerPlan(0.0, rng.randint(0, mu), rng.randint(0, mc)))
    got = split_within_layers([h for _, h, _ in layers], [c for _, _, c in layers], scales, shapes, fixed, 1, None)
    for (shape, heads, channels), (sa, sf), f, g in zip(layers, scales, fixed, got):
        budget = f.remove_units * shape.unit_params + f.remove_channels * shape.channel_params
        mu, mc = layer_limits(shape)
        # exhaustive: every (units, channels) pair; the least-miss pairs, then the least weighted cost
        pairs = [(abs(u * shape.unit_params + c * shape.channel_params - budget),
                  sa * heads.costs[u] + sf * _interp(channels, c), u, c)
                 for u, c in itertools.product(range(mu + 1), range(mc + 1))]
        least_miss = min(p[0] for p in pairs)
        best = min(p for p in pairs if p[0] == least_miss)
        assert (g.remove_units, g.remove_channels) == (best[2], best[3])
        assert abs(g.remove_units * shape.unit_params + g.remove_channels * shape.channel_params - budget) < shape.channel_params
        assert g.ratio == pytest.approx((g.remove_units * shape.unit_params + g.remove_channels * shape.channel_params)
                                        / shape.prunable)


def test_split_moves_the_budget_to_the_cheaper_kind():
    shape = LayerShape(4, 30, 20, 3)
    heads = CostCurve([0, 1, 2, 3], [0.0, 10.0, 20.0, 30.0], 30)
    channels = CostCurve(list(range(20)), [0.1 * i for i in range(20)], 3)
    fixed = [LayerPlan(0.0, 1, 9)]  # 57 parameters: one head and 9 channels, or 19 channels
    got = split_within_layers([heads], [channels], [(1.0, 1.0)], [shape], fixed, 1, None)[0]
    assert (got.remove_units, got.remove_channels) == (0, 19)
    expensive_channels = split_within_layers([heads], [CostCurve(channels.counts, [20 * c for c in channels.costs], 3)],
                                             [(1.0, 1.0)], [shape], fixed, 1, None)[0]
    assert (expensive_channels.remove_units, expensive_channels.remove_channels) == (1, 9)


def test_blend_is_the_mean_of_two_plans_on_budget_and_on_the_channel_multiple():
    shapes = [LayerShape(8, 100, 64, 10)] * 3
    a = [LayerPlan(0, 6, 8), LayerPlan(0, 2, 40), LayerPlan(0, 1, 24)]
    b = [LayerPlan(0, 2, 40), LayerPlan(0, 4, 24), LayerPlan(0, 3, 16)]
    target = sum(p.remove_units * 100 + p.remove_channels * 10 for p in a)
    got = blend_plans(a, b, shapes, target, 8, None)
    assert [p.remove_units for p in got] == [4, 3, 2]
    assert all((64 - p.remove_channels) % 8 == 0 for p in got)
    removed = sum(p.remove_units * 100 + p.remove_channels * 10 for p in got)
    assert abs(removed - target) <= 8 * 10 / 2
    for p, pa, pb in zip(got, a, b):  # channels near the mean of the two plans (the budget moved at most a step)
        assert abs(p.remove_channels - (pa.remove_channels + pb.remove_channels) / 2) <= 8


def test_candidate_families_on_a_tiny_model_hit_the_budget():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    ids = torch.randint(3, 128, (12, 24), generator=torch.Generator().manual_seed(0))
    report = slimflow.prune(model, ids, ratio=0.3, schedule="adaptive", device="cpu", progress=False,
                            schedule_options={"families": ["cost", "fixed", "split", "blend", "flat"], "search_samples": 6,
                                              "holdout": 3})
    search = report.settings["allocation"]["search"]
    assert {"split:uniform", "split:log_increase:2", "blend:uniform", "blend:log_increase:4",
            "flat:log_increase:2"} <= set(search["scores"])
    assert search["families"] == ["cost", "fixed", "split", "blend", "flat"]
    assert abs(report.realised_fraction - 0.3) < 0.005


@pytest.mark.parametrize("bad", ["split", [], ["cost", "nearest"], [3]])
def test_unknown_families_are_refused_before_any_work(bad):
    with pytest.raises(ScheduleError, match="families must be a non-empty list"):
        check_schedule_options("adaptive", {"families": bad})


def test_candidate_plans_by_family():
    shapes = [LayerShape(4, 30, 20, 3)] * 2
    heads = [CostCurve([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0], 30)] * 2
    channels = [CostCurve(list(range(20)), [0.1 * i for i in range(20)], 3)] * 2
    fixed = {"uniform": [LayerPlan(0, 1, 10)] * 2}
    args = (heads, channels, [(1.0, 1.0)] * 2, [(1.0, 1.0)] * 2, shapes, 120, "gradient", fixed, 1, None)
    assert list(candidate_plans(*args, families=("cost", "fixed"))) == ["cost:gradient", "cost:residual", "uniform"]
    assert list(candidate_plans(*args, families=("split", "blend"))) == ["split:uniform", "blend:uniform"]


@pytest.mark.parametrize("multiple", [1, 4])
def test_flat_keeps_the_head_units_and_removes_one_proportion_of_channels_on_budget(multiple):
    shapes = [LayerShape(4, 30, 64, 3), LayerShape(4, 30, 64, 3), LayerShape(4, 30, 32, 3)]
    heads_from = [LayerPlan(0, 0, 50), LayerPlan(0, 1, 2), LayerPlan(0, 2, 0)]
    target = 3 * 30 + 48 * 3  # the head units' 90 parameters and 48 channels
    got = flat_channel_plan(heads_from, shapes, target, multiple, None)
    assert [p.remove_units for p in got] == [0, 1, 2]
    assert all((s.channels - p.remove_channels) % multiple == 0 for p, s in zip(got, shapes))
    removed = sum(p.remove_units * 30 + p.remove_channels * 3 for p in got)
    assert abs(removed - target) <= multiple * 3 / 2
    # 48 of 160 channels: 30% of every layer's width, the wider layers giving twice as many
    for p, s in zip(got, shapes):
        assert abs(p.remove_channels - 0.3 * s.channels) <= multiple
        assert p.ratio == pytest.approx((p.remove_units * 30 + p.remove_channels * 3) / s.prunable)
    assert flat_channel_plan([LayerPlan(0, 3, 0)] * 3, shapes, 200, 1, None) is None  # 270 parameters of heads > 200
    # no head units: 700 parameters would need 233 channels, more than the floors leave (157 of 160)
    assert flat_channel_plan([LayerPlan(0, 0, 0)] * 3, shapes, 700, 1, None) is None


def test_flat_family_takes_the_cost_plan_and_the_non_uniform_shapes():
    shapes = [LayerShape(4, 30, 20, 3)] * 2
    heads = [CostCurve([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0], 30)] * 2
    channels = [CostCurve(list(range(20)), [0.1 * i for i in range(20)], 3)] * 2
    fixed = {"uniform": [LayerPlan(0, 1, 10)] * 2, "log_increase:2": [LayerPlan(0, 0, 12), LayerPlan(0, 2, 8)]}
    args = (heads, channels, [(1.0, 1.0)] * 2, [(1.0, 1.0)] * 2, shapes, 120, "gradient", fixed, 1, None)
    got = candidate_plans(*args, families=("flat",))
    assert list(got) == ["flat:cost:gradient", "flat:log_increase:2"]
    assert [p.remove_units for p in got["flat:log_increase:2"]] == [0, 2]
    assert [p.remove_channels for p in got["flat:log_increase:2"]] == [10, 10]
