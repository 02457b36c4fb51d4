"""The layer-by-layer pipeline and `slimflow.prune` on tiny random models of every supported family."""

import pytest
import torch

import slimflow
from slimflow.adapters import UnsupportedModelError
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.schedules import ScheduleError
from slimflow.pipeline import _run_to, capture_layer_inputs
from tests.tiny_models import tiny_model


def calibration(n=16, seqlen=24, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "mistral", "qwen2"])
def test_prune_runs_and_compensation_helps_every_layer(family):
    model = tiny_model(family)
    before = sum(p.numel() for p in model.parameters())
    report = slimflow.prune(model, calibration(), ratio=0.3, schedule="linear", progress=False)
    assert report.params_before == before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert abs(report.realised_fraction - 0.3) < 0.05  # tiny layers: coarse rounding steps
    for layer in report.layers:
        assert layer.attn_error <= layer.attn_error_uncompensated + 1e-6
        assert layer.ffn_error <= layer.ffn_error_uncompensated + 1e-6
    out = model(calibration(2, 8, seed=1)).logits
    assert torch.isfinite(out).all()
    for layer, w in zip(model.model.layers, report.widths):
        assert layer.self_attn.q_proj.out_features == w.num_attention_heads * 16
        assert layer.self_attn.num_key_value_groups == 4 // (2 if family != "llama" else 4)
        assert layer.mlp.down_proj.in_features == w.intermediate_size
    assert model.config.slimflow_layer_widths == [w.to_dict() for w in report.widths]


def test_pruning_is_deterministic():
    a, b = tiny_model("llama"), tiny_model("llama")
    slimflow.prune(a, calibration(), 0.25, progress=False)
    slimflow.prune(b, calibration(), 0.25, progress=False)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_layer_statistics_match_a_full_forward():
    """The Hessian the pipeline collects for layer 0 equals the one seen in a plain forward of the dense model."""
    model = tiny_model("llama_gqa", attn_implementation="sdpa")
    ids = calibration(6, 20)
    direct = HessianAccumulator(64, dtype=torch.float64)
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: direct.add(a[0].double()))
    with torch.no_grad():
        model(ids[:4])
        model(ids[4:])
    handle.remove()
    from slimflow.adapters import get_adapter

    adapter = get_adapter(model)
    hidden, kwargs = capture_layer_inputs(model, adapter, ids, 4, torch.device("cpu"))
    piped = HessianAccumulator(64, dtype=torch.float64)
    with torch.no_grad():
        _run_to(model.model.layers[0], model.model.layers[0].self_attn.o_proj, hidden, kwargs, 4, piped)
    torch.testing.assert_close(piped.hessian, direct.hessian, rtol=1e-5, atol=1e-6)


def test_magnitude_uses_same_widths_without_compensation():
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = slimflow.prune(a, calibration(), 0.3, progress=False)
    rb = slimflow.prune(b, calibration(), 0.3, method="magnitude", progress=False)
    assert ra.widths == rb.widths
    for layer in rb.layers:
        assert layer.attn_error == pytest.approx(layer.attn_error_uncompensated)


def test_iterative_pruning_counts_against_the_original_size():
    model = tiny_model("llama")
    dense = sum(p.numel() for p in model.parameters())
    slimflow.prune(model, calibration(), 0.15, progress=False)
    report = slimflow.prune(model, calibration(), 0.3, reference_params=dense, progress=False)
    assert abs(report.realised_fraction - 0.3) < 0.05
    assert report.params_after < report.params_before


def test_bad_inputs_fail_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(ScheduleError, match=r"\(0, 1\)"):
        slimflow.prune(model, calibration(), 1.5, progress=False)
    with pytest.raises(ValueError, match="positions"):
        slimflow.prune(model, calibration(2, 300), 0.2, progress=False)
    with pytest.raises(ValueError, match="unknown pruning method"):
        slimflow.prune(model, calibration(), 0.2, method="nope", progress=False)
    with pytest.raises(ScheduleError, match="Lower the ratio|every head"):
        slimflow.prune(model, calibration(), 0.8, progress=False)
    assert model.model.layers[0].self_attn.q_proj.out_features == 64  # untouched


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        slimflow.prune(model, calibration(), 0.2, progress=False)


def test_large_ffns_keep_gpu_friendly_widths_by_default():
    from slimflow.api import plan

    wide = tiny_model("llama", intermediate_size=4096)
    assert all((4096 - p.remove_channels) % 64 == 0 for p in plan(wide, 0.3).layers)
    assert any((96 - p.remove_channels) % 64 for p in plan(tiny_model("llama"), 0.3).layers)
    with pytest.raises(ValueError, match="channel_multiple"):
        plan(wide, 0.3, channel_multiple=0)
