"""Phi-3 (`Phi3ForCausalLM`): fused `qkv_proj` (query, key, value rows) and fused `gate_up_proj` (gate, up rows).
Its attention splits `qkv` by `config.num_attention_heads`, so each pruned layer carries its own config copy.
No bias flags."""

from slimflow.adapters.base import ModelAdapter

PHI3 = ModelAdapter(
    model_types=("phi3",),
    stock_class="Phi3ForCausalLM",
    attention_inputs=(("qkv_proj", ("q", "kv", "kv")),),
    mlp_inputs=(("gate_up_proj", ("c", "c")),),
    layer_config=True,
)
