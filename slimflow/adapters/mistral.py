"""Mistral (`MistralForCausalLM`): the LLaMA layout with GQA and an optional sliding window."""

from slimflow.adapters.base import ModelAdapter

MISTRAL = ModelAdapter(model_types=("mistral",))
