"""Pruning methods, one module each, registered by name (`method="slimgpt"`)."""

from slimflow.methods import magnitude, slimgpt  # noqa: F401  (registration)
from slimflow.methods.base import Decision, PruningMethod, available_methods, get_method

__all__ = ["Decision", "PruningMethod", "available_methods", "get_method"]
