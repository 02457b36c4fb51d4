"""The interface every layer-wise pruning method implements, and the method registry."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimflow.algorithms.hessian import HessianAccumulator


@dataclass
class Decision:
    """Which input units of the owning projection go, and that projection's new full-width weight.

    `weight` keeps the original input width; the removed columns are zero. Surgery deletes them later.
    """

    removed: list[int]
    weight: torch.Tensor
    damping_added: float = 0.0


class PruningMethod:
    """A layer-wise structured pruning method.

    `prune_heads` sees the `o_proj` weight (`[hidden, heads·head_dim]`, fp32) and the statistics of its
    inputs; a unit is `unit_size` contiguous input columns (one KV group). `prune_channels` sees `down_proj`.
    Both return a `Decision`. Methods that do not compensate return the weight with the columns zeroed.
    """

    name: str = ""
    compensates: bool = False

    def prune_heads(self, weight: torch.Tensor, stats: HessianAccumulator, unit_size: int, n_remove: int) -> Decision:
        raise NotImplementedError

    def prune_channels(self, weight: torch.Tensor, stats: HessianAccumulator, n_remove: int) -> Decision:
        raise NotImplementedError


def zero_columns(weight: torch.Tensor, cols: list[int]) -> torch.Tensor:
    out = weight.clone()
    out[:, cols] = 0
    return out


def unit_columns(units: list[int], unit_size: int) -> list[int]:
    return [c for u in units for c in range(u * unit_size, (u + 1) * unit_size)]


_REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str | PruningMethod, **kwargs) -> PruningMethod:
    if isinstance(name, PruningMethod):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name](**kwargs)
