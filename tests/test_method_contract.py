"""The method contract: `slimflow.prune` calls the same hooks on every method, and what a method does differently
it says by overriding a hook. Each method here is defined in this file, overrides one hook and sets no flag."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import slimflow
from slimflow import method_options
from slimflow.algorithms.schedules import LayerPlan
from slimflow.errors import InvalidValueError
from slimflow.methods import get_method
from slimflow.methods.base import Decision, PruningMethod, unit_columns, zero_columns
from slimflow.streaming import NotStreamableError, check_streamable


def calibration(n=8, seqlen=24):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


class DropLast(PruningMethod):
    """Removes the highest-indexed units and channels (a plain layer-wise method: no hook overridden)."""

    name = "drop-last"

    def prune_heads(self, weight, stats, unit_size, n_remove):
        removed = list(range(weight.shape[1] // unit_size - n_remove, weight.shape[1] // unit_size))
        return Decision(removed, zero_columns(weight, unit_columns(removed, unit_size)))

    def prune_channels(self, weight, stats, n_remove):
        removed = list(range(weight.shape[1] - n_remove, weight.shape[1]))
        return Decision(removed, zero_columns(weight, removed))


class OneUnitPerLayer(DropLast):
    """Chooses its own widths (`allocate`): one head unit per layer, no channel."""

    def allocate(self, budget, schedule_plan):
        return [LayerPlan(0.1, 1, 0) for _ in budget.shapes]


class InShots(PruningMethod):
    """Prunes the whole model in two shots through `run`; each shot drops channel 0 of every layer."""

    name = "in-shots"

    def __init__(self):
        super().__init__()
        self.limits = []

    def run(self, engine, plans):
        return engine.prune_in_shots(2, self.shot, 0.9)

    def shot(self, model, adapter, calibration, remove_params, device, limits):
        self.limits.append(limits)
        out = {}
        for i, layer in enumerate(adapter.layers(model)):
            down = adapter.down_proj(layer).weight.detach().float()
            out[i] = (None, Decision([0], zero_columns(down, [0]), cost=1.0))
        return out


class UnitBias(DropLast):
    """Its channel decisions add 1 to every `down_proj` bias: it adds the biases itself (`prepare_model`)."""

    def prepare_model(self, model, adapter):
        adapter.add_output_biases(model)

    def prune_channels(self, weight, stats, n_remove):
        decision = super().prune_channels(weight, stats, n_remove)
        decision.bias = torch.ones(weight.shape[0], dtype=weight.dtype)
        return decision


class WholeModel(DropLast):
    def streamable(self) -> bool:
        return False


def test_a_plain_method_follows_the_schedule():
    report = slimflow.prune(tiny_model("llama_gqa"), calibration(), 0.3, method=DropLast(), progress=False)
    assert all(r.kept_channels == list(range(len(r.kept_channels))) for r in report.layers)  # the last ones went
    assert sum(96 - len(r.kept_channels) for r in report.layers) > 0
    assert report.settings["method"] == "drop-last" and report.settings["schedule"] == "log_increase"


def test_a_method_allocating_its_own_widths_overrides_allocate():
    report = slimflow.prune(tiny_model("llama_gqa"), calibration(), 0.3, method=OneUnitPerLayer(), progress=False)
    assert [r.kept_units for r in report.layers] == [[0]] * 3
    assert [len(r.kept_channels) for r in report.layers] == [96] * 3


def test_a_whole_model_method_is_reached_through_run():
    method = InShots()
    report = slimflow.prune(tiny_model("llama_gqa"), calibration(), 0.3, method=method, progress=False,
                            max_layer_ratio=0.5)
    assert len(method.limits) == 2  # both shots ran; prune_heads/prune_channels were never called
    assert [r.kept_channels[:2] for r in report.layers] == [[2, 3]] * 3  # shot 2 saw the shrunk layers
    assert method.limits[0][0] == (1, 48) and method.limits[1][0] == (1, 47)  # the caller's cap (0.5) applies
    assert all(r.ffn_error == 2.0 for r in report.layers)  # the shots' costs are summed per layer


def test_a_bias_writing_method_prepares_the_model_itself():
    model = tiny_model("llama_gqa")
    report = slimflow.prune(model, calibration(), 0.3, method=UnitBias(), progress=False)
    pruned = [i for i, r in enumerate(report.layers) if len(r.kept_channels) < 96]
    assert pruned
    for i in pruned:
        torch.testing.assert_close(model.model.layers[i].mlp.down_proj.bias.detach(), torch.ones(64))


def test_streaming_asks_the_method_whether_it_decides_layer_by_layer():
    check_streamable(DropLast())
    with pytest.raises(NotStreamableError, match="drop-last"):
        check_streamable(WholeModel())
    for name in ("slimgpt", "magnitude", "wanda-sp"):
        check_streamable(get_method(name))
    for name in ("flap", "taylor", "slimllm", "llm-surgeon"):
        with pytest.raises(NotStreamableError):
            check_streamable(get_method(name))


def test_options_are_one_typed_dataclass_per_method():
    method = get_method(method_options.llm_surgeon(shots=3))
    assert method.name == "llm-surgeon" and method.options.shots == 3
    assert get_method("llm-surgeon", shots=3).options == method.options  # the deprecated mapping, same options
    assert get_method("llm_surgeon").options == method_options.llm_surgeon()
    report = slimflow.prune(tiny_model("llama_gqa"), calibration(), 0.3, method=method_options.slimgpt(damp=0.05),
                            progress=False)
    assert report.settings["method_options"] == {"damp": 0.05, "exact_head_score": False, "group_floor": 64,
                                                 "group_cap": 1024}


@pytest.mark.parametrize("build,phrase", [
    (lambda: method_options.slimgpt(damp="high"), "option damp must be float, got 'high'; its options"),
    (lambda: method_options.taylor(mode="both"), "option mode must be 'param_first' or 'vectorize'"),
    (lambda: method_options.llm_surgeon(shots=0), "method 'llm-surgeon': shots must be ≥ 1, got 0"),
    (lambda: get_method("flap", biass=False), "method 'flap' has no option 'biass'; its options (with defaults) "
                                              "are: bias=True"),
    (lambda: get_method("pruned-by-hand"), "unknown pruning method 'pruned-by-hand'; available: flap,"),
])
def test_a_bad_option_is_a_one_line_user_error(build, phrase):
    with pytest.raises(InvalidValueError) as raised:
        build()
    assert phrase in str(raised.value) and "\n" not in str(raised.value)
