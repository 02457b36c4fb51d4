"""Model-family adapters. A new family is one new file here (a `ModelAdapter(...)`) plus one line in `_ADAPTERS`."""

from __future__ import annotations

from torch import nn

from slimflow.adapters.base import ModelAdapter
from slimflow.adapters.gemma2 import GEMMA2
from slimflow.adapters.llama import LLAMA
from slimflow.adapters.mistral import MISTRAL
from slimflow.adapters.phi3 import PHI3
from slimflow.adapters.qwen2 import QWEN2
from slimflow.errors import SlimflowUserError

_ADAPTERS: tuple[ModelAdapter, ...] = (LLAMA, MISTRAL, QWEN2, GEMMA2, PHI3)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in _ADAPTERS for t in a.model_types)


class UnsupportedModelError(SlimflowUserError, ValueError):
    pass


def adapter_for_config(config) -> ModelAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"slimflow cannot prune model_type={model_type!r}. Supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. A new family needs one adapter file in slimflow/adapters/."
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    return adapter_for_config(model.config)


__all__ = ["ModelAdapter", "get_adapter", "adapter_for_config", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError"]
