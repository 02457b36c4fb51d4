"""The small contract between slimflow's callbacks and any LightningModule, plus the event bus between callbacks.

Contract (all a LightningModule needs to gain pruning, LoRA, evaluation and export):

- the Hugging Face causal LM lives at an attribute of the module, `model` by default (dotted paths such as
  `backbone.lm` work too; every callback takes `model_attr`). Callbacks read it with `getattr` and write it
  back with `setattr` when PEFT wraps or merges it;
- if that attribute is `None` when a callback first needs it, the callback calls `pl_module.configure_model()`,
  so a module may load its model lazily there;
- a tokenizer is found at `pl_module.tokenizer`, else `trainer.datamodule.tokenizer`, else it is loaded from
  the model's `name_or_path`;
- `configure_optimizers` must only use parameters with `requires_grad` (LoRA freezes the rest).
- for checkpoints that restore into a fresh module, `on_load_checkpoint(checkpoint)` calls
  `slimflow.lightning.restore_architecture(self, checkpoint)` (see `slimflow.lightning.restore`).

Callbacks of slimflow talk to each other through the methods of `SlimflowCallback` (`on_before_prune`, ...),
called on every slimflow callback of the trainer, so their order in `trainer.callbacks` does not matter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer



def get_model(pl_module: LightningModule, attr: str = "model"):
    """The Hugging Face model at `attr` (dotted) of `pl_module`, loading it via `configure_model()` if None."""
    model = _get_attr(pl_module, attr)
    if model is None and hasattr(pl_module, "configure_model"):
        pl_module.configure_model()
        model = _get_attr(pl_module, attr)
    if model is None:
        raise AttributeError(
            f"{type(pl_module).__name__}.{attr} is None: slimflow callbacks need the Hugging Face model at "
            f"`{attr}` (set model_attr=... on the callback if it lives elsewhere)"
        )
    return model


def set_model(pl_module: LightningModule, attr: str, model) -> None:
    owner_path, _, name = attr.rpartition(".")
    owner = _get_attr(pl_module, owner_path) if owner_path else pl_module
    setattr(owner, name, model)


def _get_attr(obj, attr: str):
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise AttributeError(
                f"{type(obj).__name__} has no attribute {name!r}: slimflow callbacks look for the Hugging Face "
                f"model at `{attr}` (pass model_attr=... to the callback)"
            )
        obj = getattr(obj, name)
    return obj


def base_model(model):
    """The transformers model under a PEFT wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_tokenizer(trainer: Trainer, pl_module: LightningModule, model=None):
    for owner in (pl_module, trainer.datamodule):
        tokenizer = getattr(owner, "tokenizer", None)
        if tokenizer is not None and not isinstance(tokenizer, str):
            return tokenizer
    from slimflow.models import load_tokenizer

    name = base_model(model).config._name_or_path if model is not None else None
    if not name:
        raise AttributeError("no tokenizer: set `tokenizer` on the LightningModule or the DataModule")
    return load_tokenizer(name, pad_with_eos=False)


def run_dir(trainer: Trainer, dirpath: str | None = None) -> Path:
    """Where a callback writes its outputs: `dirpath` if given, else the trainer's `default_root_dir`."""
    path = Path(dirpath or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_checkpoint(trainer: Trainer) -> dict | None:
    """The checkpoint this run will restore, read in `setup` (before Lightning restores it), or None.

    Lightning 2.6 resolves `fit(ckpt_path=...)` only after every `setup` hook has run, so at `setup` time the
    path is known only if it was assigned to `trainer.ckpt_path` before the call (the slimflow CLI does this
    for `--ckpt_path`). A `trainer.ckpt_path` left over from an earlier call that was given `ckpt_path=` is not
    what the coming call restores, so only an assigned one counts. The file is memory-mapped, so reading a few
    keys of a large checkpoint is cheap.
    """
    path = trainer.ckpt_path
    if not path or not getattr(trainer._checkpoint_connector, "_user_managed", True) or not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def before_strategy_setup(trainer: Trainer, work) -> None:
    """Run `work()` once, just before `trainer.strategy.setup` in the current `fit`.

    That is the one point where both hold: any checkpoint of `fit(ckpt_path=...)` has been restored (module,
    then callback state), and the strategy has not yet moved, wrapped (DDP) or built the optimizer over the
    model. Lightning has no hook there (`Callback.setup` runs before the checkpoint path is even known), so
    the strategy's `setup` is wrapped for one call. Strategies that restore checkpoints only after their
    `setup` (FSDP, DeepSpeed) run `work()` at once instead.
    """
    strategy = trainer.strategy
    if strategy.restore_checkpoint_after_setup:
        work()
        return
    cancel_before_strategy_setup(trainer)
    original = strategy.setup

    def setup(*args, **kwargs):
        cancel_before_strategy_setup(trainer)
        work()
        return original(*args, **kwargs)

    setup.slimflow_deferred = True
    strategy.setup = setup


def cancel_before_strategy_setup(trainer: Trainer) -> None:
    """Remove a pending `before_strategy_setup` (a `fit` that failed before reaching the strategy)."""
    if getattr(trainer.strategy.__dict__.get("setup"), "slimflow_deferred", False):
        del trainer.strategy.setup


def callback_state(checkpoint: dict | None, callback: Callback) -> dict | None:
    if checkpoint is None:
        return None
    return checkpoint.get("callbacks", {}).get(callback.state_key)


class SlimflowCallback(Callback):
    """Base of slimflow's callbacks: the events they exchange, all no-ops by default.

    Events are sent with `notify(trainer, name, ...)` to every `SlimflowCallback` in `trainer.callbacks`. Each
prune sends `on_stage_end` (not before the first), `on_before_prune`, `on_after_prune`, `on_stage_start`.
    """

    def check(self, trainer: Trainer, pl_module: LightningModule, model) -> None:
        """Validate the configuration against `model` (dense), before any calibration or pruning work."""

    def on_stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: int) -> None:
        """Training of stage `stage` is over and stage `stage + 1` is about to prune (adapters merge here)."""

    def on_before_prune(self, trainer: Trainer, pl_module: LightningModule, stage: int) -> None:
        """Called before stage `stage` (0-based) prunes the model (after `on_stage_end` of the previous one)."""

    def on_after_prune(self, trainer: Trainer, pl_module: LightningModule, stage: int, report) -> None:
        """Called after stage `stage` pruned the model; `report` is the engine's `PruneReport`."""

    def on_stage_start(self, trainer: Trainer, pl_module: LightningModule, stage: int) -> None:
        """The pruned model of stage `stage` is about to be finetuned (adapters are injected here)."""

    def on_architecture_restored(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Called when `slimflow.lightning.restore_architecture` rebuilt the module's model to the widths and
        LoRA wrapping recorded in `checkpoint`, before its weights load (callback state is restored later)."""

    def on_before_merge(self, trainer: Trainer, pl_module: LightningModule, peft_model, final: bool) -> None:
        """Called before LoRA weights are merged (`final`: at the end of training, not between stages)."""


def slimflow_callbacks(trainer: Trainer, kind: type = SlimflowCallback) -> list:
    return [cb for cb in trainer.callbacks if isinstance(cb, kind)]


def notify(trainer: Trainer, event: str, *args) -> None:
    for cb in slimflow_callbacks(trainer):
        getattr(cb, event)(trainer, *args)
