"""Pruning methods, one module each, registered by name (`method="slimgpt"`)."""

from slimflow.methods import flap, llm_surgeon, magnitude, slimgpt, slimllm, taylor, wanda_sp  # noqa: F401  (registration)
from slimflow.methods.base import Budget, Decision, PruningMethod, available_methods, get_method

__all__ = ["Budget", "Decision", "PruningMethod", "available_methods", "get_method"]
