"""Per-layer ratio schedules and the parameter-budget solver."""

import math

import pytest

from slimflow.algorithms.schedules import (
    LayerShape,
    ScheduleError,
    layer_limits,
    layer_ratios,
    max_removable,
    plan_layers,
    schedule_shape,
)


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
    with pytest.raises(ScheduleError, match="Lower the ratio to at most 0.741"):
        plan_layers(shapes, 0.75, 27_534_720)  # fits in the decoder, but not above the per-layer floors
    plan = plan_layers(shapes, 0.62, 27_534_720, "log_increase", max_ratio=0.9)
    assert all(p.remove_units < 12 for p in plan.layers)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        schedule_shape("cosine", 4)


def gqa_8_layer_shapes(tied=False):
    # 8 layers, hidden 384, 12 query heads of 32 in 4 KV groups, FFN 1024 (the shape that used to fail at 0.5)
    d, dh, heads, kv, m = 384, 32, 12, 4, 1024
    unit = (heads // kv) * dh * d * 2 + 2 * dh * d  # q + o columns of the group, k + v rows
    return [LayerShape(kv, unit, m, 3 * d) for _ in range(8)], (1 if tied else 2) * 8000 * d


@pytest.mark.parametrize("schedule", ["uniform", "linear", "log_increase"])
@pytest.mark.parametrize("fraction", [0.5, 0.7])
@pytest.mark.parametrize("channel_multiple", [1, 64])
def test_every_schedule_keeps_the_floors_and_hits_the_target(schedule, fraction, channel_multiple):
    shapes, embed = gqa_8_layer_shapes(tied=fraction > 0.6)  # 70% of the untied model is below the floors
    total = embed + sum(s.prunable for s in shapes)
    plan = plan_layers(shapes, fraction, total, schedule, channel_multiple=channel_multiple)
    assert abs(plan.realised_fraction - fraction) <= 0.005
    for p, s in zip(plan.layers, shapes):
        max_units, max_channels = layer_limits(s, channel_multiple)
        assert 0 <= p.remove_units <= max_units < s.head_units
        assert 0 <= p.remove_channels <= max_channels
        assert s.channels - p.remove_channels >= max(16, channel_multiple)  # 1/64 of 1024 channels
        assert (s.channels - p.remove_channels) % channel_multiple == 0
        assert 0 <= p.ratio <= 1
    if schedule != "uniform":  # the clamped last layers handed their share to the first ones
        assert plan.layers[0].remove_units <= plan.layers[-1].remove_units


def test_floors_redistribute_instead_of_failing_on_a_short_gqa_model():
    shapes, embed = gqa_8_layer_shapes()
    total = embed + sum(s.prunable for s in shapes)
    plan = plan_layers(shapes, 0.5, total, "log_increase")
    assert plan.layers[-1].remove_units == 3  # at the floor: one of four KV groups stays
    assert sum(p.remove_units == 3 for p in plan.layers) >= 2
    assert abs(plan.realised_fraction - 0.5) <= 0.005
    # the unclamped shape asks more than the floor allows of the last layers (it used to fail there)
    assert layer_ratios("log_increase", plan.decoder_ratio, [1.0] * 8)[-1] > 1 - 16 / 1024


def test_unreachable_ratio_names_the_largest_reachable_one():
    shapes, embed = gqa_8_layer_shapes(tied=True)
    total = embed + sum(s.prunable for s in shapes)
    most = max_removable(shapes)
    assert most == sum(3 * s.unit_params + (1024 - 16) * s.channel_params for s in shapes)
    best = most / total
    plan = plan_layers(shapes, best - 0.001, total, "log_increase")
    assert plan.realised_fraction <= best
    with pytest.raises(ScheduleError, match=f"at most {math.floor(best * 1000) / 1000}"):
        plan_layers(shapes, best + 0.001, total, "uniform")
    with pytest.raises(ScheduleError, match="max_layer_ratio=0.5"):
        plan_layers(shapes, 0.5, total, "uniform", max_ratio=0.5)
