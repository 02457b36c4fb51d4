"""Gemma-2 (alternating sliding / full layers) and Phi-3 (fused qkv and gate_up) end to end: pruning with the
layer-wise pipeline and a gradient method, save, reload both ways, families that cannot hold biases."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import slimflow
from slimflow.adapters import get_adapter
from slimflow.checkpoint import load_pruned, save_pruned
from slimflow.surgery import layer_widths


def calibration(n=8, seqlen=20, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
@pytest.mark.parametrize("method", ["slimgpt", "taylor"])
def test_new_families_prune_save_and_reload_both_ways(family, method, tmp_path):
    model = tiny_model(family)
    report = slimflow.prune(model, calibration(), 0.3, method=method, schedule="uniform", progress=False)
    assert abs(report.realised_fraction - 0.3) < 0.06
    assert any(len(r.kept_units) < 2 for r in report.layers) and all(len(r.kept_channels) < 96 for r in report.layers)
    ids = calibration(2, 12, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    path = save_pruned(model, tmp_path / "ckpt", report=report)
    # eager on both: older transformers give Gemma-2 an SDPA path that skips its attention soft-capping
    for loaded in (load_pruned(path, attn_implementation="eager"),
                   AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")):
        assert layer_widths(loaded) == layer_widths(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_phi3_fused_projections_are_cut_per_segment():
    """Removing KV group 0 keeps the query, key and value rows of group 1 of the fused qkv_proj, in order."""
    model = tiny_model("phi3")
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    q, k, v, _ = (t.detach().clone() for t in adapter.attention_weights(model, layer))
    gate, up, _ = (t.detach().clone() for t in adapter.mlp_weights(layer))
    slimflow.surgery.prune_heads(adapter, layer, 16, [1])
    slimflow.surgery.prune_channels(adapter, layer, [0, 5, 7])
    q2, k2, v2, o2 = adapter.attention_weights(model, layer)
    assert torch.equal(q2, q[32:]) and torch.equal(k2, k[16:]) and torch.equal(v2, v[16:])
    assert o2.shape == (64, 32) and layer.self_attn.config.num_attention_heads == 2
    assert model.config.num_attention_heads == 4  # the model's own config is not touched
    gate2, up2, _ = adapter.mlp_weights(layer)
    assert torch.equal(gate2, gate[[0, 5, 7]]) and torch.equal(up2, up[[0, 5, 7]])


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_bias_writing_methods_name_the_alternatives(family):
    with pytest.raises(ValueError, match="cannot hold"):
        slimflow.prune(tiny_model(family), calibration(), 0.3, method="flap", progress=False)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_gguf_export_refuses_families_llama_cpp_deci_cannot_run(family, tmp_path):
    """llama.cpp's deci graph (the one with per-layer widths) runs the LLaMA layout only: Gemma-2's extra norms and
    soft-capping and Phi-3's fused projections are refused with the reason, and no file is left behind."""
    from tiny_models import tiny_tokenizer

    from slimflow.export.gguf import GGUFExportError, write_gguf

    model = tiny_model(family)
    slimflow.prune(model, calibration(), 0.3, schedule="uniform", progress=False)
    with pytest.raises(GGUFExportError, match=f"model_type='{family}'"):
        write_gguf(model, tiny_tokenizer(), tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())
