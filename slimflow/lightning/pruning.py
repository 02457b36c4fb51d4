"""Calibration and structured pruning as Lightning callbacks (prune in `setup`, re-prune at epoch boundaries)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer

from slimflow.lightning.access import (
    SlimflowCallback, base_model, before_strategy_setup, callback_state, cancel_before_strategy_setup, get_model,
    get_tokenizer, notify, run_dir, slimflow_callbacks,
)
from slimflow.lightning.data import CalibrationData
from slimflow.lightning.logs import log_metrics, pruning_metrics, say
from slimflow.lightning.report import write_pruning_report
from slimflow.lightning.restore import restore_known_checkpoint, save_architecture
from slimflow import method_options
from slimflow.errors import InvalidValueError
from slimflow.method_options import MethodSpec


@dataclass
class RatioSchedule:
    """How one stage's parameter ratio is spread over the layers (SlimGPT's `log_increase` prunes deep layers
    more).

    Args:
        name: `adaptive` (widths from OBS cost curves measured on the calibration data), `uniform`, `linear` or
            `log_increase`.
        spread: largest / smallest layer ratio of the non-uniform schedules.
        max_layer_ratio: cap on any layer's ratio.
        channel_multiple: keep FFN widths a multiple of this; null: 64 for FFNs of 4096+ channels (fast GPU
            shapes), else 1.
        options: options of the adaptive schedule (docs/engine.md): `search` (default true: also score the cost
            plans, the fixed shapes and their blends on other windows of the calibration source, 128 × 512
            tokens, and keep the best),
            `search_samples` (32), `holdout` (16), `score` (`loss` or `kl`), `normalize` (`gradient`,
            `residual`, `none`), `points` (64), `families` (`[cost, fixed, blend]`; also `split`, `flat`),
            `score_on` (`source`; `calibration`: held-out calibration sequences; `generated`, `text`:
            docs/engine.md), `score_context` (window lengths
            the candidates are scored at, e.g. `[128, 512]`; default the whole calibration sequences), `confirm`
            (2: the two best candidates are pruned again on every calibration sequence before one is kept;
            `"families"`: the best of each family only), `confirm_families` (true: the best candidate of each
            family is pruned again too);
            e.g. `{"search": false}`.
    """

    name: Literal["adaptive", "uniform", "linear", "log_increase"] = "log_increase"
    spread: float = 4.0
    max_layer_ratio: float | None = None
    channel_multiple: int | None = None
    options: dict | None = None

    def kwargs(self) -> dict:
        return {"schedule": self.name, "spread": self.spread, "max_layer_ratio": self.max_layer_ratio,
                "channel_multiple": self.channel_multiple, "schedule_options": self.options}


class Calibration(SlimflowCallback):
    """Draws the calibration sequences that `StructuredPruning` feeds through the model.

    The sequences are drawn lazily, the first time a prune needs them (never on resume), from a
    `CalibrationData` built from these arguments, with the tokenizer of the LightningModule.

    Args:
        source: local text/.gz/.json/.jsonl path or hub dataset (`allenai/c4`, alias `c4`, `wikitext2`).
        num_samples: number of sequences.
        seqlen: tokens per sequence.
        seed: seed of the window offsets.
        skip_tokens: tokens skipped at the start of the text (keep clear of an evaluation prefix).
        generated_samples: add this many sequences sampled from the model itself (seeded by `seed`) to the
            drawn ones, at each prune: recommended where the calibration text is narrow (docs/results.md).
            Default: 256 (fewer beyond 512 tokens: 256 × 512 tokens in all) when `StructuredPruning` uses
            the adaptive schedule, else 0.
    """

    def __init__(self, source: str = "c4", num_samples: int = 128, seqlen: int = 2048, seed: int = 0,
                 skip_tokens: int = 0, generated_samples: int | None = None):
        if generated_samples is not None and generated_samples < 0:
            raise InvalidValueError(f"Calibration generated_samples must be ≥ 0, got {generated_samples}")
        self.data = CalibrationData(source, None, num_samples, seqlen, seed, skip_tokens)
        self.generated_samples = generated_samples
        self.checksum = 0

    def check(self, trainer, pl_module, model) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and self.data.seqlen > limit:
            raise InvalidValueError(f"Calibration seqlen={self.data.seqlen} exceeds the model's {limit} positions")

    def ids(self, trainer: Trainer, pl_module: LightningModule, model) -> torch.Tensor:
        ids = self.data.ids(get_tokenizer(trainer, pl_module, model))
        self.checksum = int(ids.sum())
        return ids

    def scoring(self, trainer: Trainer, pl_module: LightningModule, model) -> torch.Tensor | None:
        """Windows of the source that no calibration sequence overlaps, for the adaptive schedule's search."""
        return self.data.scoring_ids(get_tokenizer(trainer, pl_module, model))

    def state_dict(self) -> dict:
        d = self.data
        return {"num_samples": d.num_samples, "seqlen": d.seqlen, "seed": d.seed, "skip_tokens": d.skip_tokens,
                "generated_samples": self.generated_samples, "checksum": self.checksum}

    def load_state_dict(self, state_dict: dict) -> None:
        self.checksum = state_dict.get("checksum", 0)


def _light_report(report) -> dict:
    """The engine report without the per-layer kept-index lists (small enough for a Lightning checkpoint)."""
    data = report.to_dict()
    data["layers"] = [{k: v for k, v in layer.items() if k not in ("kept_units", "kept_channels")}
                      for layer in data["layers"]]
    data["markdown"] = report.to_markdown()
    return data


class StructuredPruning(SlimflowCallback):
    """Prunes whole attention heads (KV groups) and FFN channels with the slimflow engine (`slimflow.api.prune`).

    The first prune runs when `fit` has restored any checkpoint and before Lightning moves the model and builds
    the optimizer (right before `trainer.strategy.setup`); the settings are checked earlier, in `setup`. An
    iterative recipe lists several cumulative ratios and the epochs at whose start each one is applied, e.g.
    `ratio: [0.2, 0.35]`, `at_epochs: [0, 2]`: later prunes merge the current LoRA, prune, inject a fresh LoRA
    and rebuild the optimizer (`trainer.strategy.setup_optimizers`; single-device strategies only). Each
    stage's optimizer gets its own warmup + cosine (`CausalLMModule` asks `stage_steps`).

    Checkpoints record the pruned widths (`slimflow.lightning.restore`); a module whose `on_load_checkpoint`
    calls `restore_architecture` (as `CausalLMModule` does) is rebuilt from them before its weights load, so
    `trainer.fit(module, ckpt_path=...)` resumes without pruning again. A second `fit` with the same callback
    does not prune again either.

    Needs a `Calibration` callback in the same Trainer. Writes `pruning_report.md`, `pruning_widths.png` and
    `pruning.json` to `dirpath` (default: the trainer's `default_root_dir`).

    Args:
        ratio: fraction of the dense model's parameters removed, or one cumulative fraction per stage.
        at_epochs: epoch at whose start each stage prunes (default `[0]`, i.e. in `setup`).
        schedule: per-layer ratio schedule.
        method: pruning method and its options: a name (`slimgpt`, `magnitude`, `wanda-sp`, `taylor`, `flap`,
            `slimllm`, `llm-surgeon`) or `{class_path: NAME, init_args: {OPTION: VALUE}}` (YAML), e.g.
            `{class_path: slimgpt, init_args: {damp: 0.02}}`; on the command line `...method slimgpt` then
            `...method.damp 0.02`. Options (defaults): {options}.
        method_kwargs: deprecated: options of a method given by name, as a mapping.
        batch_size: calibration sequences per forward pass.
        device: where each layer is processed (default: CUDA if available).
        model_attr: attribute of the LightningModule holding the Hugging Face model.
        dirpath: where the pruning report goes.
        progress: print what the prune is doing, with per-layer progress bars where the Trainer shows progress
            bars (`enable_progress_bar`).
    """

    def __init__(self, ratio: float | list[float] = 0.2, at_epochs: list[int] | None = None,
                 schedule: RatioSchedule | None = None, method: MethodSpec = method_options.slimgpt(),
                 method_kwargs: dict | None = None,
                 batch_size: int = 8, device: str | None = None, model_attr: str = "model",
                 dirpath: str | None = None, progress: bool = True):
        self.ratios = [float(r) for r in (ratio if isinstance(ratio, (list, tuple)) else [ratio])]
        self.at_epochs = list(at_epochs) if at_epochs is not None else [0]
        self.schedule = schedule or RatioSchedule()
        self.method, self.method_kwargs = method, method_kwargs
        self.method_name = ""  # set with the options by `_check_options`
        self.batch_size, self.device, self.model_attr = batch_size, device, model_attr
        self.dirpath, self.progress = dirpath, progress
        if len(self.at_epochs) != len(self.ratios):
            raise InvalidValueError(f"{len(self.ratios)} ratios but {len(self.at_epochs)} at_epochs: give one epoch per stage")
        if any(not 0 < r < 1 for r in self.ratios) or any(b <= a for a, b in zip(self.ratios, self.ratios[1:])):
            raise InvalidValueError(f"ratios must increase within (0, 1) (each is cumulative), got {self.ratios}")
        if any(e < 0 for e in self.at_epochs) or any(b <= a for a, b in zip(self.at_epochs, self.at_epochs[1:])):
            raise InvalidValueError(f"at_epochs must increase from 0 upwards, got {self.at_epochs}")
        self.stage = 0  # prunes done
        self._check_options()
        self.dense_params: int | None = None
        self.dense_widths: list[list[int]] = []
        self.widths: list[list[int]] = []
        self.reports: list[dict] = []

    # ------------------------------------------------------------------------------------------- checks
    def _check_options(self) -> None:
        """Method, method options and device are checked when the callback is built, before any work."""
        from slimflow.methods import get_method
        from slimflow.models import resolve_device

        pruner = get_method(self.method, **(self.method_kwargs or {}))
        # each prune builds the method anew from its options (a method given built is used as it is)
        self.method_name, self._method_spec = pruner.name, pruner if pruner is self.method else pruner.options
        if self.device is not None:
            resolve_device(self.device)

    def check(self, trainer, pl_module, model) -> None:
        from slimflow.api import plan

        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.at_epochs[-1] >= max_epochs:
            raise InvalidValueError(f"StructuredPruning prunes at epoch {self.at_epochs[-1]} but training stops after "
                             f"max_epochs={max_epochs}: raise max_epochs or lower at_epochs")
        if len(self.ratios) > 1 and trainer.world_size > 1:
            raise InvalidValueError(
                f"an iterative recipe ({len(self.ratios)} prunes) cannot run on {trainer.world_size} processes: a "
                "later prune replaces Parameters that DDP's gradient buckets or FSDP's shards were built on in "
                "strategy.setup, and Lightning cannot re-wrap a model mid-fit. Run it with --trainer.devices 1, "
                "or chain one-prune runs (each its own `slimflow fit` on the previous export)")
        if not slimflow_callbacks(trainer, Calibration):
            raise InvalidValueError("StructuredPruning needs a slimflow.lightning.Calibration callback in the Trainer")
        s = self.schedule
        for ratio in self.ratios:  # each stage checked against the dense model, before any calibration work
            plan(model, ratio, s.name, None, s.spread, s.max_layer_ratio, s.channel_multiple)

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = base_model(get_model(pl_module, self.model_attr))
        if restore_known_checkpoint(trainer, pl_module) or stage != "fit" or self.stage > 0:
            return  # rebuilt from a checkpoint, or pruned by an earlier fit of these callbacks: never again
        notify(trainer, "check", pl_module, model)
        if self.at_epochs[0] == 0:  # after any checkpoint of this fit is restored, before the optimizer exists
            before_strategy_setup(trainer, lambda: self._first_prune(trainer, pl_module))

    def _first_prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stage == 0:  # a restored checkpoint (callback state) says whether it was pruned already
            self.prune(trainer, pl_module)

    def pending(self) -> bool:
        """Whether a prune is still to come (then LoRA is injected after it, not in `setup`)."""
        return self.stage < len(self.ratios)

    def on_architecture_restored(self, trainer, pl_module, checkpoint) -> None:
        state = callback_state(checkpoint, self)
        if state:
            self.load_state_dict(state)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        save_architecture(pl_module, checkpoint, self.model_attr)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        cancel_before_strategy_setup(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stage < len(self.ratios) and trainer.current_epoch >= self.at_epochs[self.stage]:
            self.prune(trainer, pl_module)
            trainer.strategy.setup_optimizers(trainer)

    def stage_steps(self, trainer: Trainer) -> int | None:
        """Optimizer steps from the current stage's start to the next prune (or the end of training)."""
        total = int(trainer.estimated_stepping_batches)
        if len(self.ratios) == 1 and self.at_epochs[0] == 0:
            return None
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        start = self.at_epochs[self.stage - 1] * per_epoch if self.stage else 0
        end = self.at_epochs[self.stage] * per_epoch if self.stage < len(self.ratios) else total
        return max(1, min(end, total) - start)

    # ------------------------------------------------------------------------------------------- pruning
    def prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run the next stage: notify, calibrate, prune in place, record, write the report, notify."""
        from slimflow.api import default_generated_samples, prune, searches
        from slimflow.surgery import count_parameters, layer_widths

        k = self.stage
        if k > 0:
            notify(trainer, "on_stage_end", pl_module, k - 1)
        notify(trainer, "on_before_prune", pl_module, k)
        model = base_model(get_model(pl_module, self.model_attr))  # LoRA (if any) was merged by now
        if self.dense_params is None:
            self.dense_params = count_parameters(model)
            self.dense_widths = [list(w.to_dict().values()) for w in layer_widths(model)]
        calibrate = slimflow_callbacks(trainer, Calibration)[0]
        stage = f"stage {k + 1}/{len(self.ratios)}: " if len(self.ratios) > 1 else ""
        count = calibrate.generated_samples
        if count is None:
            count = default_generated_samples(self.schedule.kwargs().get("schedule"), seqlen=calibrate.data.seqlen)
        if self.progress:
            sampled = f" (+ {count} sampled from the model)" if count else ""
            say(trainer, f"{stage}drawing {calibrate.data.num_samples} x {calibrate.data.seqlen} calibration tokens "
                         f"from {calibrate.data.source}{sampled}")
        calibration = calibrate.ids(trainer, pl_module, model)
        kwargs = self.schedule.kwargs()
        scoring = calibrate.scoring(trainer, pl_module, model) \
            if searches(kwargs["schedule"], kwargs["schedule_options"]) else None
        if self.progress:
            say(trainer, f"{stage}pruning {self.ratios[k]:.0%} of {self.dense_params:,} parameters with {self.method_name} "
                         f"({self.schedule.name}), layer by layer")
        bars = self.progress and trainer.progress_bar_callback is not None  # the Trainer's progress-bar setting
        with torch.no_grad():
            report = prune(model, calibration, ratio=self.ratios[k], method=self._method_spec,
                           reference_params=self.dense_params, batch_size=self.batch_size, device=self._device(trainer),
                           progress=bars, generated_samples=count, seed=calibrate.data.seed, scoring=scoring,
                           **kwargs)
        self.stage = k + 1
        self.widths = [list(w.to_dict().values()) for w in report.widths]
        self.reports.append(_light_report(report))
        if self.progress:
            say(trainer, f"{stage}pruned in {report.wall_time:.1f} s: {report.params_before:,} -> "
                         f"{report.params_after:,} parameters ({report.realised_fraction:.2%} of the dense model removed)")
        log_metrics(trainer, pruning_metrics(self.reports[-1], k))
        if trainer.is_global_zero:
            self.write_report(trainer)
        notify(trainer, "on_after_prune", pl_module, k, report)
        notify(trainer, "on_stage_start", pl_module, k)

    def _device(self, trainer: Trainer):
        """The callback's device, else this rank's GPU under a multi-GPU strategy (else the engine's default)."""
        root = trainer.strategy.root_device
        return self.device or (root if root.type == "cuda" else None)

    def write_report(self, trainer: Trainer) -> None:
        out = run_dir(trainer, self.dirpath)
        (out / "pruning.json").write_text(json.dumps(self.pruning_record(), indent=2) + "\n")
        write_pruning_report(out, self.dense_params, self.dense_widths, self.reports)

    def pruning_record(self) -> dict:
        """`pruning.json` of the run: the keys `slimflow prune` writes (`params_before`, `params_after`,
        `realised_fraction`, `target_fraction`, `layer_widths`) for the latest stage, plus the callback state."""
        last = self.last_report or {}
        keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        return {"params_before": self.dense_params, "params_after": last.get("params_after"),
                "realised_fraction": last.get("realised_fraction"), "target_fraction": last.get("target_fraction"),
                "layer_widths": [dict(zip(keys, w)) for w in self.widths], **self.state_dict()}

    @property
    def last_report(self) -> dict | None:
        return self.reports[-1] if self.reports else None

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"stage": self.stage, "ratios": self.ratios, "at_epochs": self.at_epochs,
                "dense_params": self.dense_params, "dense_widths": self.dense_widths, "widths": self.widths,
                "reports": self.reports}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("ratios", self.ratios)[: state_dict["stage"]] != self.ratios[: state_dict["stage"]]:
            raise InvalidValueError(f"the checkpoint was pruned with ratios {state_dict['ratios']}, this run asks for "
                             f"{self.ratios}: start a new run directory instead of resuming")
        self.stage = state_dict["stage"]
        self.dense_params = state_dict["dense_params"]
        self.dense_widths = state_dict["dense_widths"]
        self.widths = state_dict["widths"]
        self.reports = state_dict["reports"]


StructuredPruning.__doc__ = StructuredPruning.__doc__.replace("{options}", method_options.options_help())
