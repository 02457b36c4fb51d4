"""Qwen2 (`Qwen2ForCausalLM`): the LLaMA layout plus q/k/v biases (sliced together with their rows)."""

from slimflow.adapters.base import ModelAdapter

QWEN2 = ModelAdapter(model_types=("qwen2",))
