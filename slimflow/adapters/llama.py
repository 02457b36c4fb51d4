"""LLaMA 1/2/3 (`LlamaForCausalLM`): q/k/v/o without biases, SwiGLU MLP, optional GQA."""

from slimflow.adapters.base import ModelAdapter

LLAMA = ModelAdapter(model_types=("llama",))
