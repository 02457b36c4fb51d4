"""LLaMA 1/2/3 (`LlamaForCausalLM`): q/k/v/o, SwiGLU MLP, optional GQA; `attention_bias`/`mlp_bias` flags."""

from slimflow.adapters.base import ModelAdapter

LLAMA = ModelAdapter(model_types=("llama",), stock_class="LlamaForCausalLM", bias_flags=("attention_bias", "mlp_bias"))
