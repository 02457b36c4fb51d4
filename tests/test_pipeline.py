"""The layer-by-layer pipeline and `slimflow.prune` on tiny random models of every supported family."""

import pytest
import torch

import slimflow
from slimflow.adapters import UnsupportedModelError
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.schedules import ScheduleError
from slimflow.adapters import get_adapter
from slimflow.methods.slimgpt import SlimGPT
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
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter, ids, 4, torch.device("cpu"))
    piped = HessianAccumulator(64, dtype=torch.float64)
    with torch.no_grad():
        _run_to(model.model.layers[0], 0, model.model.layers[0].self_attn.o_proj, inputs, 4, piped, adapter)
    torch.testing.assert_close(piped.hessian, direct.hessian, rtol=1e-5, atol=1e-6)


# Families whose layers get different call arguments: Mistral's window, Qwen2's full + sliding layers (the
# window only matters because the sequences are longer than it), and tied embeddings.
PER_LAYER_CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "qwen2_sliding": ("qwen2", {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 6}),
    "gemma2_alternating": ("gemma2", {}),
}


def _dense_layer_io(model, ids):
    """Input and output of every decoder layer in one full forward of the model."""
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda m, a, k, out, i=i: seen.__setitem__(i, ((a[0] if a else k["hidden_states"]).clone(),
                                                       (out[0] if isinstance(out, tuple) else out).clone())),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(PER_LAYER_CASES))
def test_every_layer_is_replayed_with_its_own_call_arguments(case, attn):
    """Layer i, called with the captured arguments of layer i on the captured inputs, reproduces what the full
    model feeds layer i+1 (a sliding-window layer replayed with a full-attention mask would not)."""
    family, overrides = PER_LAYER_CASES[case]
    if family == "gemma2" and attn == "sdpa":
        attn = "eager"  # Gemma-2's soft-capped attention has no SDPA path: both cases run eager
    model = tiny_model(family, attn_implementation=attn, **overrides)
    ids = calibration(4, 20)
    dense = _dense_layer_io(model, ids)
    inputs = capture_layer_inputs(model, get_adapter(model), ids, 4, torch.device("cpu"))
    torch.testing.assert_close(inputs.hidden, dense[0][0])
    hidden = inputs.hidden
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            torch.testing.assert_close(hidden, dense[i][0], rtol=1e-5, atol=1e-5)
            out = layer(hidden, **inputs.kwargs(i, 4))
            hidden = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(hidden, dense[len(model.model.layers) - 1][1], rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_are_calibrated_with_their_window():
    """The pruned Qwen2 model with sliding layers equals, layer by layer, what the pipeline saw: every layer's
    o_proj Hessian (kept columns) matches a forward of the final model."""
    family, overrides = PER_LAYER_CASES["qwen2_sliding"]
    _check_statistics_follow_the_pruned_model(tiny_model(family, **overrides))


class _Recording(SlimGPT):
    """SlimGPT that keeps the statistics it was given, per layer."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def prune_heads(self, weight, stats, unit_size, n_remove):
        self.seen.append({"o_proj": stats.hessian.clone(), "unit": unit_size})
        return super().prune_heads(weight, stats, unit_size, n_remove)

    def prune_channels(self, weight, stats, n_remove):
        self.seen[-1]["down_proj"] = stats.hessian.clone()
        return super().prune_channels(weight, stats, n_remove)


def _check_statistics_follow_the_pruned_model(model, ids=None):
    ids = calibration(8, 20) if ids is None else ids
    method = _Recording()
    report = slimflow.prune(model, ids, 0.3, schedule="uniform", method=method, batch_size=4, progress=False)
    final = [{"o_proj": HessianAccumulator(l.self_attn.o_proj.in_features, dtype=torch.float64),
              "down_proj": HessianAccumulator(l.mlp.down_proj.in_features, dtype=torch.float64)}
             for l in model.model.layers]
    hooks = []
    for layer, acc in zip(model.model.layers, final):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, h=acc["o_proj"]: h.add(a[0].double())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, h=acc["down_proj"]: h.add(a[0].double())))
    with torch.no_grad():
        model(ids[:4])
        model(ids[4:])
    for h in hooks:
        h.remove()
    for i, (seen, acc, result) in enumerate(zip(method.seen, final, report.layers)):
        cols = torch.cat([torch.arange(u * seen["unit"], (u + 1) * seen["unit"]) for u in result.kept_units])
        torch.testing.assert_close(seen["o_proj"][cols][:, cols].double(), acc["o_proj"].hessian, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"layer {i} o_proj: {m}")
        chans = torch.tensor(result.kept_channels)
        torch.testing.assert_close(seen["down_proj"][chans][:, chans].double(), acc["down_proj"].hessian, rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"layer {i} down_proj: {m}")


@pytest.mark.parametrize("family", ["llama_gqa", "mistral"])
def test_each_layer_is_calibrated_on_the_outputs_of_the_pruned_layers_before_it(family):
    """Without propagation (or propagating dense outputs) the later layers' statistics would not match a
    forward of the final pruned model."""
    _check_statistics_follow_the_pruned_model(tiny_model(family))


def test_user_hooks_on_attention_survive_pruning():
    """An accelerate hook on an attention block still runs after `slimflow.prune` (the replay swaps modules
    instead of patching `forward`)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        def __init__(self):
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    model = tiny_model("llama_gqa")
    hooks = [Count() for _ in model.model.layers]
    for layer, hook in zip(model.model.layers, hooks):
        add_hook_to_module(layer.self_attn, hook)
    slimflow.prune(model, calibration(8, 16), 0.3, schedule="uniform", batch_size=4, progress=False)
    during = [h.calls for h in hooks]
    assert during == [2] * len(hooks)  # pass (1) of each layer runs attention once per batch, later passes replay
    with torch.no_grad():
        model(calibration(2, 8, seed=3))
    assert [h.calls for h in hooks] == [c + 1 for c in during]
    assert all(hasattr(layer.self_attn, "_hf_hook") for layer in model.model.layers)


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
