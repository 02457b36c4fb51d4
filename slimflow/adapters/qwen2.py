"""Qwen2 (`Qwen2ForCausalLM`): the LLaMA layout plus q/k/v biases (sliced with their rows), optional
sliding-window layers (`layer_types`); o_proj and the MLP cannot hold biases."""

from slimflow.adapters.base import ModelAdapter

QWEN2 = ModelAdapter(model_types=("qwen2",), stock_class="Qwen2ForCausalLM")
