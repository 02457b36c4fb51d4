"""The interface every layer-wise pruning method implements, and the method registry."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.distributed import DataParallel
from slimflow.errors import InvalidValueError


@dataclass
class Decision:
    """Which input units of the owning projection go, and that projection's new full-width weight.

    `weight` keeps the original input width; the removed columns are zero. Surgery deletes them later.
    """

    removed: list[int]
    weight: torch.Tensor
    damping_added: float = 0.0
    bias: torch.Tensor | None = None  # added to the projection's bias (methods with `adds_bias`)


class PruningMethod:
    """A layer-wise structured pruning method.

    `prune_heads` sees the `o_proj` weight (`[hidden, heads·head_dim]`, fp32) and the statistics of its
    inputs; a unit is `unit_size` contiguous input columns (one KV group). `prune_channels` sees `down_proj`.
    Both return a `Decision`. Methods that do not compensate return the weight with the columns zeroed.
    """

    name: str = ""
    compensates: bool = False
    # Optional capabilities (defaults keep the plain layer-wise contract):
    adds_bias: bool = False  # decisions carry `bias`; llama-family models get zero biases first
    allocates_widths: bool = False  # `prepare` returns the per-layer plan; ratio schedules are refused
    prunes_globally: bool = False  # the whole model at once through `global_shot` (see pipeline.prune_global)
    needs_gradients: bool = False  # calibration runs backward passes through the model
    # The processes sharing the calibration set (set by `slimflow.prune`). `prepare` sees this rank's share of
    # the sequences and sums its own statistics over the group; `global_shot` gets all sequences and shards them.
    data_parallel: DataParallel = DataParallel.local()

    def prepare(self, model, adapter, calibration: torch.Tensor, budget: "Budget", device, batch_size: int):
        """Optional global step before the layer-wise pass (dense-model statistics, gradients).

        Returns a per-layer plan (`list[LayerPlan]`) when the method allocates widths itself, else None."""
        return None

    def begin_layer(self, index: int, layer, adapter) -> None:
        """Called before layer `index` is calibrated (methods may hook its modules here)."""

    def end_layer(self, index: int, layer) -> None:
        """Called after layer `index` is pruned and its outputs propagated."""

    def prune_heads(self, weight: torch.Tensor, stats: HessianAccumulator, unit_size: int, n_remove: int) -> Decision:
        raise NotImplementedError

    def prune_channels(self, weight: torch.Tensor, stats: HessianAccumulator, n_remove: int) -> Decision:
        raise NotImplementedError


@dataclass
class Budget:
    """What a width-allocating method must remove: `target_params` parameters from layers of `shapes`."""

    shapes: list  # list[LayerShape], current widths and the parameters per unit / channel
    target_params: float
    fraction: float
    reference_params: int
    channel_multiple: int = 1
    max_layer_ratio: float | None = None


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
        raise InvalidValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    cls = _REGISTRY[name]
    valid = method_options(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise InvalidValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options "
                                f"(with defaults) are: {listed}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a value the method refuses, e.g. shots=0
        raise InvalidValueError(f"method {name!r}: {err}") from err


def method_options(cls: type[PruningMethod]) -> dict:
    """The keyword options of a method class and their defaults."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
