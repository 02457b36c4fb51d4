"""A structurally pruned causal LM whose layers have their own attention-head and FFN widths.

Written next to the weights by slimflow. Load with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; only torch and transformers are needed.

config.json keeps the dense model's global sizes, lists each layer's widths under `slimflow_layer_widths`
(`num_attention_heads`, `num_key_value_heads`, `intermediate_size`) and, under `slimflow_slicing`, which
projections hold query/key/value rows and FFN channels (fused projections list several row segments). The stock
model is built from the global sizes, then each layer's projections are cut to its recorded widths before the
weights are loaded. Pruning removes whole KV groups, so `head_dim` and the query heads per KV head stay as in
the global config. The family's class is appended at the end of this file by slimflow.
"""

from __future__ import annotations

import copy

from torch import nn


def _leading(linear: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
    """A Linear holding the first `rows` outputs and first `cols` inputs of `linear` (weights are loaded later)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[:rows]
        bias = None if bias is None else bias[:rows]
    if cols is not None:
        weight = weight[:, :cols]
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return new


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _apply_layer_widths(model: nn.Module, widths: list[dict], spec: dict) -> None:
    layers = model.model.layers
    if len(widths) != len(layers):
        raise ValueError(f"config.json records {len(widths)} layer widths for a model with {len(layers)} layers")
    head_dim = _head_dim(model.config)
    for layer, width in zip(layers, widths):
        heads, kv_heads = width["num_attention_heads"], width["num_key_value_heads"]
        channels = width["intermediate_size"]
        rows = {"q": heads * head_dim, "kv": kv_heads * head_dim, "c": channels}
        attn, mlp = getattr(layer, spec["attention"]), getattr(layer, spec["mlp"])
        for name, segments in spec["attention_inputs"]:
            setattr(attn, name, _leading(getattr(attn, name), rows=sum(rows[s] for s in segments)))
        setattr(attn, spec["o_proj"], _leading(getattr(attn, spec["o_proj"]), cols=rows["q"]))
        # Attention kernels repeat each KV head this many times; the value must come from the layer, not the config.
        attn.num_key_value_groups = heads // kv_heads
        attn.num_heads, attn.num_key_value_heads = heads, kv_heads  # the layer's widths, read off its modules
        if spec.get("layer_config"):  # the attention reads its head counts from its config at run time
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv_heads
        for name, segments in spec["mlp_inputs"]:
            setattr(mlp, name, _leading(getattr(mlp, name), rows=sum(rows[s] for s in segments)))
        setattr(mlp, spec["down_proj"], _leading(getattr(mlp, spec["down_proj"]), cols=channels))
        mlp.intermediate_size = channels


class _PerLayerWidths:
    """Builds the stock model from the global config, then cuts each layer to `config.slimflow_layer_widths`."""

    def __init__(self, config, *args, **kwargs):
        # Transformers versions that understand `per_layer_config` refuse global reads of per-layer sizes, but the
        # stock layers are built from the global ones (the widest layer's). Build without it and keep it off, so
        # `config.num_key_value_heads` reads the same value as on slimflow's own loader; per-layer widths stay in
        # `config.slimflow_layer_widths`.
        if getattr(config, "is_heterogeneous", False):
            config.per_layer_config = None
        super().__init__(config, *args, **kwargs)
        widths = getattr(config, "slimflow_layer_widths", None)
        if widths:
            _apply_layer_widths(self, widths, config.slimflow_slicing)
