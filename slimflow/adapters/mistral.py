"""Mistral (`MistralForCausalLM`): the LLaMA layout with GQA and an optional sliding window; no bias flags."""

from slimflow.adapters.base import ModelAdapter

MISTRAL = ModelAdapter(model_types=("mistral",), stock_class="MistralForCausalLM")
