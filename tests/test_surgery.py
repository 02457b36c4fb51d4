"""Physically pruned models must compute exactly what the dense model computes with the removed units masked."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, padded_batch, tiny_model

from slimflow.adapters import get_adapter
from slimflow.surgery import (
    LayerWidths,
    apply_widths,
    count_parameters,
    layer_widths,
    prune_channels,
    prune_heads,
)

HEAD_DIM = 16
# Per layer, the KV-group units and FFN channels to remove: different in every layer, some layers untouched.
REMOVED_UNITS = {4: ([1], [0, 3], []), 2: ([0], [], [1])}
REMOVED_CHANNELS = ([3, 17, 40, 41, 95], list(range(0, 96, 3)), [])


def _masked_copy(model, removed_units, removed_channels):
    """A dense copy whose removed units and channels contribute nothing to the residual stream."""
    masked = copy.deepcopy(model)
    adapter = get_adapter(masked)
    with torch.no_grad():
        for layer, units, channels in zip(adapter.layers(masked), removed_units, removed_channels):
            heads, kv = adapter.layer_heads(masked, layer)
            o = adapter.o_proj(layer)
            unit_width = (heads // kv) * HEAD_DIM
            for unit in units:
                o.weight[:, unit * unit_width : (unit + 1) * unit_width] = 0
            adapter.down_proj(layer).weight[:, channels] = 0
    return masked


def _pruned_copy(model, removed_units, removed_channels):
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    for layer, units, channels in zip(adapter.layers(pruned), removed_units, removed_channels):
        n_units = adapter.layer_heads(pruned, layer)[1]
        if units:
            prune_heads(adapter, layer, HEAD_DIM, [u for u in range(n_units) if u not in units])
        if channels:
            prune_channels(adapter, layer, [c for c in range(96) if c not in channels])
    return pruned


def _removal_plan(model):
    return REMOVED_UNITS[model.config.num_key_value_heads], REMOVED_CHANNELS


def _logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


# Gemma-2's soft-capped attention has no SDPA path in transformers.
@pytest.mark.parametrize("family,attn_implementation",
                         [(f, a) for f in FAMILIES for a in ("eager", "sdpa") if (f, a) != ("gemma2", "sdpa")])
def test_pruned_matches_masked(family, attn_implementation):
    model = tiny_model(family, attn_implementation)
    units, channels = _removal_plan(model)
    masked, pruned = _masked_copy(model, units, channels), _pruned_copy(model, units, channels)
    input_ids, attention_mask = padded_batch()
    real = attention_mask.bool()

    expected = _logits(masked, input_ids, attention_mask)
    actual = _logits(pruned, input_ids, attention_mask)
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)
    # Masking changed the model, so the comparison above is not vacuous.
    assert not torch.allclose(_logits(model, input_ids, attention_mask)[real], expected[real], atol=1e-3)

    generate = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(pruned.generate(**generate), masked.generate(**generate))


@pytest.mark.parametrize("family", FAMILIES)
def test_widths_and_parameter_count_follow_the_modules(family):
    model = tiny_model(family)
    units, channels = _removal_plan(model)
    pruned = _pruned_copy(model, units, channels)
    groups = 4 // model.config.num_key_value_heads
    kv_heads = [model.config.num_key_value_heads - len(u) for u in units]
    expected = [LayerWidths(kv * groups, kv, 96 - len(c)) for kv, c in zip(kv_heads, channels)]
    assert layer_widths(pruned) == expected
    for layer, width in zip(get_adapter(pruned).layers(pruned), expected):
        assert layer.self_attn.num_key_value_groups == groups
        assert getattr(layer.mlp, "intermediate_size", width.intermediate_size) == width.intermediate_size

    hidden = model.config.hidden_size
    attn_per_kv_head = hidden * HEAD_DIM * (2 * groups + 2)  # q and o rows/cols for its queries, k and v rows
    if family == "qwen2":
        attn_per_kv_head += HEAD_DIM * (groups + 2)  # q/k/v biases
    removed = sum(len(u) for u in units) * attn_per_kv_head + sum(len(c) for c in channels) * 3 * hidden
    assert count_parameters(model) - count_parameters(pruned) == removed


def test_successive_pruning_indexes_current_units():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    once = copy.deepcopy(model)
    prune_heads(adapter, layer, HEAD_DIM, [0, 2, 3])  # drop head 1
    prune_heads(adapter, layer, HEAD_DIM, [0, 2])  # now drop original head 2 (index 1 of the remaining)
    prune_heads(get_adapter(once), get_adapter(once).layers(once)[0], HEAD_DIM, [0, 3])
    input_ids, attention_mask = padded_batch()
    assert torch.equal(_logits(model, input_ids, attention_mask), _logits(once, input_ids, attention_mask))


def test_apply_widths_rebuilds_pruned_shapes():
    model = tiny_model("llama_gqa")
    units, channels = _removal_plan(model)
    pruned = _pruned_copy(model, units, channels)
    fresh = tiny_model("llama_gqa", seed=1)
    apply_widths(fresh, layer_widths(pruned))
    assert layer_widths(fresh) == layer_widths(pruned)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    input_ids, attention_mask = padded_batch()
    assert torch.equal(_logits(fresh, input_ids, attention_mask), _logits(pruned, input_ids, attention_mask))


def test_surgery_refuses_bad_indices_and_widths():
    model = tiny_model("llama_gqa")
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    with pytest.raises(ValueError, match="at least one"):
        prune_heads(adapter, layer, HEAD_DIM, [])
    with pytest.raises(IndexError):
        prune_heads(adapter, layer, HEAD_DIM, [0, 2])
    with pytest.raises(ValueError, match="duplicate"):
        prune_heads(adapter, layer, HEAD_DIM, [1, 1])
    with pytest.raises(IndexError):
        prune_channels(adapter, layer, [-1, 4])
    with pytest.raises(ValueError, match="at least one"):
        prune_channels(adapter, layer, [])
    dense = layer_widths(model)
    with pytest.raises(ValueError, match="layers"):
        apply_widths(model, dense[:2])
    with pytest.raises(ValueError, match="group size"):
        apply_widths(model, [LayerWidths(3, 1, 96)] + dense[1:])
    with pytest.raises(ValueError, match="wider"):
        apply_widths(model, [LayerWidths(4, 2, 128)] + dense[1:])
    assert layer_widths(model) == dense
