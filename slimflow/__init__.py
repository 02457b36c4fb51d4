"""slimflow: structured pruning of large language models, layer-wise OBS (SlimGPT) inside PyTorch Lightning."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "prune": "slimflow.api",
    "PruneReport": "slimflow.api",
    "save_pruned": "slimflow.checkpoint",
    "load_pruned": "slimflow.checkpoint",
    "calibration_ids": "slimflow.data.calibration",
}


def __getattr__(name: str):
    # Lazy so that `import slimflow` stays cheap and the algorithm layer never pulls in Lightning.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimflow' has no attribute {name!r}")


__all__ = list(_LAZY)
