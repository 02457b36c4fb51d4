"""The options of every pruning method, one documented dataclass each: the one schema of `slimflow.prune`, the
`StructuredPruning` callback and the `slimflow prune` / `compare` / `fit` commands.

A class is named like its method on the command line (`--method slimgpt --method.damp 0.02`; `wanda-sp` and
`llm-surgeon` are also spelled `wanda_sp` and `llm_surgeon` there), so jsonargparse resolves the short name and
`--print_config` shows every option with its default. This module imports nothing heavy: `slimflow prune --help`
reads it without loading torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

from slimflow.errors import InvalidValueError


class MethodOptions:
    """The options of one pruning method (`method` is the registered name of the method they configure)."""

    method: ClassVar[str] = ""

    def __post_init__(self):
        """Every value of the option's type (one-line error naming the options), then the method's own `check`."""
        hints = typing.get_type_hints(type(self))
        for key in type(self).fields():
            value = getattr(self, key)
            if not _fits(value, hints[key]):
                raise InvalidValueError(f"method {self.method!r}: option {key} must be {_type_name(hints[key])}, got "
                                        f"{value!r}; its options (with defaults) are: {describe(type(self))}")
        self.check()

    def check(self) -> None:
        """Refuse values the method cannot use (`InvalidValueError`)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def to_config(self) -> dict:
        """The `class_path` / `init_args` form a config file takes."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.to_dict()}

    def merged(self, values: dict) -> "MethodOptions":
        """These options with `values` replacing some of them (checked as `build` does)."""
        return type(self).build(self.to_dict() | dict(values)) if values else self

    @classmethod
    def fields(cls) -> dict:
        """Option name -> default (`None` stands in for a field without one)."""
        if not dataclasses.is_dataclass(cls):
            return {}
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls, values: dict | None = None) -> "MethodOptions":
        """`cls(**values)`, with a one-line `InvalidValueError` naming the valid options for an unknown one or a
        value the method refuses."""
        values = dict(values or {})
        valid = cls.fields()
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise InvalidValueError(f"method {cls.method!r} has no option {', '.join(map(repr, unknown))}; its options "
                                    f"(with defaults) are: {describe(cls)}")
        try:
            return cls(**values)
        except InvalidValueError:
            raise
        except (TypeError, ValueError) as err:
            raise InvalidValueError(f"method {cls.method!r}: {err}") from err


def describe(cls: type[MethodOptions]) -> str:
    """`damp=0.01, exact_head_score=False, ...`, or `none`."""
    return ", ".join(f"{k}={v!r}" for k, v in cls.fields().items()) or "none"


def _fits(value, hint) -> bool:
    """Whether `value` is of the option type `hint` (bool, int, float, str, Literal, unions of them)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check(options: MethodOptions, condition: bool, message: str) -> None:
    if not condition:
        raise InvalidValueError(f"method {options.method!r}: {message}")


# one dataclass per method; the class name is its command-line name (hence the lower case)
@dataclass(frozen=True)
class slimgpt(MethodOptions):  # noqa: N801
    """SlimGPT: layer-wise OBS head and channel removal.

    Args:
        damp: damping λ in `H += λ·mean(diag H)·I`; raised automatically if Cholesky fails.
        exact_head_score: score a head unit by its exact joint OBS error instead of the paper's grouped-Cholesky
            diagonal approximation (lower per-layer error, but worse perplexity on the reference model).
        group_floor: smallest Dynamic Group Size for FFN channels.
        group_cap: largest Dynamic Group Size.
    """

    method: ClassVar[str] = "slimgpt"
    damp: float = 0.01
    exact_head_score: bool = False
    group_floor: int = 64
    group_cap: int = 1024

    def check(self):
        _check(self, self.damp >= 0, f"damp must be ≥ 0, got {self.damp}")
        _check(self, 1 <= self.group_floor <= self.group_cap,
               f"need 1 ≤ group_floor ≤ group_cap, got {self.group_floor} and {self.group_cap}")


@dataclass(frozen=True)
class magnitude(MethodOptions):  # noqa: N801
    """Magnitude: keep the input columns of largest L2 norm (no options)."""

    method: ClassVar[str] = "magnitude"


@dataclass(frozen=True)
class wanda_sp(MethodOptions):  # noqa: N801
    """Wanda-sp: activation-weighted magnitude of the input columns (no options)."""

    method: ClassVar[str] = "wanda-sp"


@dataclass(frozen=True)
class taylor(MethodOptions):  # noqa: N801
    """Taylor: first-order importance from LM-loss gradients.

    Args:
        mode: `param_first` (sum of |w·g|) or `vectorize` (|Σ w·g| per group).
        grad_batch_size: sequences per forward/backward micro-batch (memory: activations of this many).
    """

    method: ClassVar[str] = "taylor"
    mode: Literal["param_first", "vectorize"] = "param_first"
    grad_batch_size: int = 2

    def check(self):
        _check(self, self.mode in ("param_first", "vectorize"),
               f"taylor mode must be 'param_first' or 'vectorize', got {self.mode!r}")
        _check(self, self.grad_batch_size >= 1, f"grad_batch_size must be ≥ 1, got {self.grad_batch_size}")


@dataclass(frozen=True)
class flap(MethodOptions):  # noqa: N801
    """FLAP: fluctuation scores, one global ranking (the method allocates the widths), bias compensation.

    Args:
        bias: write the bias compensation (llama-family models get zero q/k/v/gate/up biases so that the
            checkpoint reloads with stock classes).
    """

    method: ClassVar[str] = "flap"
    bias: bool = True


@dataclass(frozen=True)
class slimllm(MethodOptions):  # noqa: N801
    """SlimLLM: holistic head selection, PCA-weighted channel importance, regression recovery, layer allocation.

    Args:
        regression: refit o_proj/down_proj by per-channel scale and bias (adds biases; llama family only).
        swap: run the greedy swap search after the leave-one-out head ranking.
        protect: share of the lowest-scoring channels that is kept anyway (the reference keeps 1%).
        layer_allocation: per-layer ratios from layer input/output similarity (then no schedule may be given).
        alpha: softmax temperature of the allocation (default 10 up to a 35% ratio, else 7).
        active: share of layers that are pruned at all (default 26/32 up to a 35% ratio, else 30/32).
        max_layer_ratio: cap of any layer's ratio in the allocation.
    """

    method: ClassVar[str] = "slimllm"
    regression: bool = True
    swap: bool = True
    protect: float = 0.01
    layer_allocation: bool = True
    alpha: float | None = None
    active: float | None = None
    max_layer_ratio: float = 0.9


@dataclass(frozen=True)
class llm_surgeon(MethodOptions):  # noqa: N801
    """LLM Surgeon (structured): Kronecker-factored curvature, one global threshold, several shots.

    Args:
        shots: number of shots T of the linear schedule (each removes up to t/T of the budget).
        damp: relative damping of G and A.
        grad_samples: calibration sequences used per shot (default: all).
        grad_batch_size: sequences per forward/backward micro-batch.
        max_layer_ratio: never remove more than this share of one layer's heads or channels.
        per_param: rank units by cost per removed parameter (default). A head unit carries ~40× the parameters
            of a channel, so raw costs (per_param=False) all but forbid removing heads.
    """

    method: ClassVar[str] = "llm-surgeon"
    shots: int = 5
    damp: float = 0.01
    grad_samples: int | None = None
    grad_batch_size: int = 2
    max_layer_ratio: float = 0.9
    per_param: bool = True

    def check(self):
        _check(self, self.shots >= 1, f"shots must be ≥ 1, got {self.shots}")
        _check(self, self.grad_samples is None or self.grad_samples >= 1, f"grad_samples must be ≥ 1, got {self.grad_samples}")
        _check(self, self.grad_batch_size >= 1, f"grad_batch_size must be ≥ 1, got {self.grad_batch_size}")


BUILTIN = (slimgpt, magnitude, wanda_sp, taylor, flap, slimllm, llm_surgeon)

# What a `method` option accepts: a method's options, or the name of a registered method (its default options)
MethodSpec = MethodOptions | str


def as_config(spec: MethodSpec):
    """A method given as a name or options, in the form a YAML config takes."""
    return spec.to_config() if isinstance(spec, MethodOptions) else spec


def command_line_name(name: str) -> str:
    """`llm-surgeon` -> `llm_surgeon`: the spelling jsonargparse resolves to the options class."""
    return next((cls.__name__ for cls in BUILTIN if cls.method == name), name)


def options_help() -> str:
    """One line per built-in method with its options and defaults (for command help texts)."""
    return "; ".join(f"{cls.method}: {describe(cls)}" for cls in BUILTIN)
