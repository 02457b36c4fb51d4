"""The interface every layer-wise pruning method implements, and the method registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.schedules import LayerPlan
from slimflow.distributed import DataParallel
from slimflow.errors import InvalidValueError
from slimflow.method_options import BUILTIN, MethodOptions


@dataclass
class Decision:
    """Which input units of the owning projection go, and that projection's new full-width weight.

    `weight` keeps the original input width; the removed columns are zero. Surgery deletes them later.
    """

    removed: list[int]
    weight: torch.Tensor
    damping_added: float = 0.0
    bias: torch.Tensor | None = None  # added to the projection's bias (see `PruningMethod.prepare_model`)
    cost: float | None = None  # the method's own estimate of the loss increase, if it has one (LLM Surgeon)


class PruneEngine(Protocol):
    """What `PruningMethod.run` drives (implemented by `slimflow.pipeline.Engine`; methods never import it)."""

    def prune_layers(self, plans: list[LayerPlan]) -> list:
        """The layer-wise pass: per layer `begin_layer`, `prune_heads`, `prune_channels`, `end_layer`."""

    def prune_in_shots(self, shots: int, shot: Callable, max_layer_ratio: float) -> list:
        """Whole-model pruning in `shots` steps; `shot(model, adapter, calibration, remove_params, device,
        limits)` returns `{layer: (head Decision | None, channel Decision | None)}`."""


class PruningMethod:
    """A structured pruning method: a fixed sequence of hooks that `slimflow.prune` calls on every method.

    Run level, in this order (the defaults are the plain layer-wise method):
    `resolve_schedule` (which ratio schedule, if any), `prepare_model` (change the model before pruning, e.g.
    add biases), `prepare` (whole-model statistics), `allocate` (the per-layer widths; default: the schedule's),
    `run` (default: the layer-wise pass over those widths). Layer level, inside the layer-wise pass:
    `begin_layer`, `prune_heads`, `prune_channels`, `end_layer`.

    `prune_heads` sees the `o_proj` weight (`[hidden, heads·head_dim]`, fp32) and the statistics of its
    inputs; a unit is `unit_size` contiguous input columns (one KV group). `prune_channels` sees `down_proj`.
    Both return a `Decision`. Methods that do not compensate return the weight with the columns zeroed.

    The options are a `slimflow.method_options.MethodOptions` dataclass (`Options`), kept in `self.options`:
    `SlimGPT(damp=0.02)` equals `SlimGPT(method_options.slimgpt(damp=0.02))`.
    """

    name: str = ""
    Options: type[MethodOptions] = MethodOptions
    # The processes sharing the calibration set (set by `slimflow.prune`). `prepare` sees this rank's share of
    # the sequences and sums its own statistics over the group; a `run` in shots gets all sequences and shards them.
    data_parallel: DataParallel = DataParallel.local()

    def __init__(self, options: MethodOptions | None = None, **values):
        if options is not None and values:
            raise InvalidValueError(f"method {self.name!r}: give its options as one {self.Options.__name__} or as "
                                    "keywords, not both")
        if options is None:
            options = self.Options.build(values)
        elif not isinstance(options, self.Options):
            raise InvalidValueError(f"method {self.name!r} takes {self.Options.__name__} options, got "
                                    f"{type(options).__name__}")
        self.options = options

    # ------------------------------------------------------------------------------------------ run level
    def resolve_schedule(self, schedule: str | None) -> str | None:
        """The ratio schedule to use for a requested one (None: not given). Methods that allocate the widths
        themselves refuse any schedule and return None (see `slimflow.methods.common.refuse_schedule`)."""
        return schedule or "log_increase"

    def prepare_model(self, model, adapter) -> None:
        """Change the model before anything is measured (methods whose decisions carry biases add them here,
        through `adapter.add_output_biases`)."""

    def prepare(self, model, adapter, calibration: torch.Tensor, budget: "Budget", device, batch_size: int) -> None:
        """Whole-model work before the layer-wise pass (dense-model statistics, gradients)."""

    def allocate(self, budget: "Budget", schedule_plan: Callable[[], list[LayerPlan]]) -> list[LayerPlan]:
        """The per-layer widths. `schedule_plan()` computes those of the ratio schedule (the default)."""
        return schedule_plan()

    def run(self, engine: PruneEngine, plans: list[LayerPlan]) -> list:
        """Prune the model; returns one `slimflow.pipeline.LayerResult` per layer. Default: the layer-wise pass."""
        return engine.prune_layers(plans)

    def streamable(self) -> bool:
        """Whether each layer is decided from that layer alone, so `slimflow.streaming` may prune with only one
        layer in memory. A method whose `prepare_model`, `prepare` or `run` needs the whole model says False."""
        return True

    def allocation_settings(self) -> dict:
        """Settings of the `adaptive` schedule's cost curves that follow this method (SlimGPT: its damping)."""
        return {}

    def gradient_calibration(self, calibration: torch.Tensor, limit: int | None) -> torch.Tensor:
        """The calibration sequences to use when gradient passes are limited to `limit` sequences
        (`slimflow compare --grad_samples`); methods without gradient passes use them all."""
        return calibration

    # ---------------------------------------------------------------------------------------- layer level
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
    if cls.Options is not MethodOptions and cls.Options.method != cls.name:
        raise ValueError(f"{cls.__name__}.Options configures {cls.Options.method!r}, not {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(spec: "str | MethodOptions | PruningMethod", **values) -> PruningMethod:
    """The method for a registered name (with `values` as its options), a `MethodOptions`, or a method itself.

    Unknown names and options are one-line `InvalidValueError`s naming the valid ones."""
    if isinstance(spec, PruningMethod):
        if values:
            raise InvalidValueError(f"method {spec.name!r} is already built: pass its options to it, not here")
        return spec
    if isinstance(spec, MethodOptions):
        return _method_class(spec.method)(spec.merged(values))
    if not isinstance(spec, str):
        raise InvalidValueError(f"a method is a name ({', '.join(available_methods())}) or its options, got "
                                f"{type(spec).__name__}")
    return _method_class(spec)(**values)


def _method_class(name: str) -> type[PruningMethod]:
    name = {cls.__name__: cls.method for cls in BUILTIN}.get(name, name)  # llm_surgeon -> llm-surgeon
    if name not in _REGISTRY:
        raise InvalidValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]

