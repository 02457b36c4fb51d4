"""Per-layer ratio schedules and the parameter-budget solver."""

import math

import pytest

from slimflow.algorithms.schedules import LayerShape, ScheduleError, layer_ratios, plan_layers, schedule_shape


def llama7b_shapes(layers=32):
    d, dh, m = 4096, 128, 11008
    return [LayerShape(32, 4 * d * dh, m, 3 * d) for _ in range(layers)]


def test_log_increase_reproduces_reference_llama7b_example():
    r = layer_ratios("log_increase", 0.2004, [1.0] * 32)
    assert r[0] == pytest.approx(0.0625, abs=1e-3)
    assert r[-1] == pytest.approx(0.25, abs=1e-3)
    assert r[1] == pytest.approx(0.0625 + 0.1875 * math.log(2) / math.log(32), abs=1e-3)


@pytest.mark.parametrize("layers,fbar", [(16, 0.691), (28, 0.728), (32, 0.735), (40, 0.748)])
def test_weighted_mean_shape_for_homogeneous_layers(layers, fbar):
    f = schedule_shape("log_increase", layers)
    assert sum(f) / layers == pytest.approx(fbar, abs=1e-3)
    assert f[-1] == pytest.approx(1.0)  # real layer count, not a hard-coded ln 32


@pytest.mark.parametrize("schedule", ["uniform", "linear", "log_increase"])
@pytest.mark.parametrize("layers", [12, 32, 40])
def test_weighted_mean_is_the_target(schedule, layers):
    weights = [1.0 + (i % 3) for i in range(layers)]
    r = layer_ratios(schedule, 0.3, weights)
    assert sum(w * x for w, x in zip(weights, r)) / sum(weights) == pytest.approx(0.3)
    assert r == sorted(r)


def test_cap_keeps_mean():
    r = layer_ratios("log_increase", 0.5, [1.0] * 32, max_ratio=0.6)
    assert max(r) == pytest.approx(0.6)
    assert sum(r) / 32 == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["uniform", "linear", "log_increase"])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35, 0.5])
def test_plan_hits_total_fraction_within_one_percent(schedule, fraction):
    shapes = llama7b_shapes()
    total = 6_738_415_616  # LLaMA-7B incl. embeddings and lm_head
    plan = plan_layers(shapes, fraction, total, schedule)
    assert abs(plan.realised_fraction - fraction) < 0.01 * fraction
    removed = sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plan.layers, shapes))
    assert removed == plan.params_removed


def test_plan_small_model_and_channel_multiple():
    shapes = [LayerShape(12, 4 * 384 * 32, 1024, 3 * 384) for _ in range(12)]
    total = 27_534_720
    plan = plan_layers(shapes, 0.2, total, "log_increase", channel_multiple=8)
    assert abs(plan.realised_fraction - 0.2) < 0.01 * 0.2 + 0.002
    assert all((1024 - p.remove_channels) % 8 == 0 for p in plan.layers)
    assert [p.remove_units for p in plan.layers] == sorted(p.remove_units for p in plan.layers)


def test_impossible_requests_fail_with_the_fix():
    shapes = [LayerShape(12, 4 * 384 * 32, 1024, 3 * 384) for _ in range(12)]
    with pytest.raises(ScheduleError, match=r"in \(0, 1\)"):
        plan_layers(shapes, 1.2, 27_534_720)
    with pytest.raises(ScheduleError, match="Lower the ratio"):
        plan_layers(shapes, 0.9, 27_534_720)  # more than the decoder holds
    with pytest.raises(ScheduleError, match="max_layer_ratio"):
        plan_layers(shapes, 0.62, 27_534_720, "log_increase")  # last layers would lose everything
    plan = plan_layers(shapes, 0.62, 27_534_720, "log_increase", max_ratio=0.9)
    assert all(p.remove_units < 12 for p in plan.layers)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        schedule_shape("cosine", 4)
