"""The adaptive schedule end to end on tiny models, and defaults that never fail on short GQA models."""

import json

import pytest
import torch

import slimflow
from slimflow.algorithms.schedules import ScheduleError, layer_limits
from slimflow.api import layer_shapes
from slimflow.adapters import get_adapter
from slimflow.cli import main
from tests.tiny_models import tiny_model, tiny_tokenizer


def _ids(n=12, length=32, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("ratio,multiple", [(0.3, 1), (0.5, 4)])
def test_adaptive_hits_the_ratio_within_the_floors(family, ratio, multiple):
    model = tiny_model(family)
    shapes = layer_shapes(model, get_adapter(model))
    report = slimflow.prune(model, _ids(), ratio=ratio, schedule="adaptive", channel_multiple=multiple,
                            progress=False, schedule_options={"search": False})
    assert abs(report.realised_fraction - ratio) <= 0.005
    for result, shape in zip(report.layers, shapes):
        max_units, max_channels = layer_limits(shape, multiple)
        assert result.widths.num_key_value_heads >= shape.head_units - max_units >= 1
        assert result.widths.intermediate_size >= shape.channels - max_channels
        assert result.widths.intermediate_size % multiple == 0
    assert report.settings["allocation"]["normalize"] == "gradient"
    heads = [r.widths.num_key_value_heads for r in report.layers]
    channels = [r.widths.intermediate_size for r in report.layers]
    assert len(set(channels)) > 1 or len(set(heads)) > 1  # not a uniform plan in disguise


def test_adaptive_takes_from_the_layer_that_costs_least():
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # layer 2's FFN barely writes to the residual stream: its channels are nearly free
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    report = slimflow.prune(model, _ids(), ratio=0.25, schedule="adaptive", progress=False,
                            schedule_options={"search": False})
    channels = [r.widths.intermediate_size for r in report.layers]
    assert channels[2] == min(channels) and channels[2] <= 4  # at or next to its floor of 2
    uniform = slimflow.prune(tiny_model("llama", num_hidden_layers=4), _ids(), ratio=0.25, schedule="uniform",
                             progress=False)
    assert [r.widths.intermediate_size for r in uniform.layers][2] > channels[2]


def test_adaptive_serves_other_layer_wise_methods_and_checks_options_first():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    report = slimflow.prune(model, _ids(), ratio=0.3, schedule="adaptive", method="wanda-sp", progress=False)
    assert abs(report.realised_fraction - 0.3) <= 0.005
    with pytest.raises(ScheduleError, match="known: normalize, points, search"):
        slimflow.prune(tiny_model(), _ids(), ratio=0.3, schedule="adaptive", schedule_options={"norm": "x"})
    with pytest.raises(ScheduleError, match="adaptive schedule only"):
        slimflow.prune(tiny_model(), _ids(), ratio=0.3, schedule="uniform", schedule_options={"normalize": "none"})


@pytest.fixture(scope="module")
def short_gqa(tmp_path_factory):
    # 8 layers, 4 KV groups of 2 query heads: the shape whose default 50% prune used to fail
    root = tmp_path_factory.mktemp("short_gqa")
    model = tiny_model("llama_gqa", num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    model.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    words = torch.randint(3, 128, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    (root / "calib.txt").write_text(" ".join(f"w{i}" for i in words))
    return root


@pytest.mark.parametrize("ratio,schedule", [(0.5, None), (0.7, None), (0.5, "adaptive"), (0.7, "uniform")])
def test_default_prune_succeeds_on_a_short_gqa_model(short_gqa, ratio, schedule):
    out = short_gqa / f"out-{ratio}-{schedule}"
    extra = ["--schedule", schedule] if schedule else []
    main(["prune", "--model", str(short_gqa / "dense"), "--calibration", str(short_gqa / "calib.txt"),
          "--output", str(out), "--num-samples", "8", "--seqlen", "32", "--ratio", str(ratio), "--progress", "false",
          *extra])
    info = json.loads((out / "pruning.json").read_text())
    assert abs(info["realised_fraction"] - ratio) <= 0.005
    assert all(layer["widths"]["num_key_value_heads"] >= 1 for layer in info["layers"])


def test_unreachable_ratio_fails_before_any_work_with_the_reachable_limit(short_gqa, monkeypatch, capsys):
    import slimflow.data.calibration

    def no_calibration(*args, **kwargs):
        raise AssertionError("the ratio must be refused before the calibration text is read")

    monkeypatch.setattr(slimflow.data.calibration, "calibration_ids", no_calibration)
    out = short_gqa / "never"
    assert main(["prune", "--model", str(short_gqa / "dense"), "--calibration", str(short_gqa / "calib.txt"),
                 "--output", str(out), "--ratio", "0.9", "--schedule", "adaptive", "--seqlen", "32"]) == 2
    assert "Lower the ratio to at most 0.8" in capsys.readouterr().err
    assert not out.exists()


def test_gradient_energy_matches_autograd_on_the_layer_outputs():
    import torch.nn.functional as F

    from slimflow.allocation import residual_gradient_energy

    model = tiny_model("llama", num_hidden_layers=3)
    ids = _ids(6, 16)
    energies = residual_gradient_energy(model, get_adapter(model), ids, batch_size=4)
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    # hidden_states[i + 1] is layer i's output (the last one is after the final norm: not compared)
    for i in range(2):
        assert energies[i][1] == pytest.approx(float(out.hidden_states[i + 1].grad.pow(2).sum()) / ids.numel(),
                                               rel=1e-4)
    assert energies[0][0] > energies[-1][0]  # early perturbations travel through more layers


@pytest.mark.parametrize("normalize", ["gradient", "residual"])
def test_allocate_weights_identical_curves_by_where_the_error_lands(normalize):
    from slimflow.algorithms.allocation import CostCurve
    from slimflow.algorithms.schedules import LayerShape
    from slimflow.allocation import allocate

    shapes = [LayerShape(4, 100, 8, 10)] * 2
    heads = [CostCurve([0, 1, 2, 3], [0.0, 1.0, 3.0, 6.0], 100)] * 2
    channels = [CostCurve(list(range(8)), [float(i * i) for i in range(8)], 10)] * 2
    # layer 1 sees a 10× larger stream (residual) / a 10× smaller loss gradient: its errors cost less
    energies, gradients = [(1.0, 1.0), (10.0, 10.0)], [(1.0, 1.0), (0.1, 0.1)]
    plans = allocate(heads, channels, energies, shapes, 400, normalize, gradients)
    assert plans[1].remove_units + plans[1].remove_channels > plans[0].remove_units + plans[0].remove_channels
    assert sum(p.remove_units * 100 + p.remove_channels * 10 for p in plans) == 400
    even = allocate(heads, channels, energies, shapes, 400, "none", gradients)
    assert (even[0].remove_units, even[0].remove_channels) == (even[1].remove_units, even[1].remove_channels)
