"""What a Lightning checkpoint of a slimflow run holds to rebuild its module, and the rebuilding.

A pruned, LoRA-wrapped module no longer has the shapes and parameter names that its constructor builds, so
the checkpoint carries its architecture under the top-level key `"slimflow"` (written by the callbacks'
`on_save_checkpoint`; plain ints, strings and lists, readable with `torch.load(..., weights_only=True)`):

    {"format": 1, "model_attr": "model",
     "widths": [[query_heads, kv_heads, ffn_channels], ...],          # one per decoder layer
     "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
              "target_modules": ["q_proj", ...]} or None}              # PEFT LoRA wrapped around it

`restore_architecture(module, checkpoint)` reshapes a freshly built (dense) module to it. It has to run in
`LightningModule.on_load_checkpoint`: that is the only hook Lightning calls before it loads the weights
(callback state is restored after them), both in `Trainer.fit/validate/test(ckpt_path=...)` and in
`Module.load_from_checkpoint(path)`. `CausalLMModule` does this; a user's own module adds two lines:

    def on_load_checkpoint(self, checkpoint):
        restore_architecture(self, checkpoint)
"""

from __future__ import annotations

from lightning.pytorch import LightningModule

from slimflow.errors import InvalidValueError
from slimflow.lightning.access import base_model, get_model, notify, set_model

KEY = "slimflow"
FORMAT = 1


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_settings(model) -> dict | None:
    """The LoRA settings of a PEFT-wrapped model's active adapter (what `LoraConfig` needs), or None."""
    if not is_peft(model):
        return None
    config = model.peft_config[getattr(model, "active_adapter", "default")]
    return {"r": int(config.r), "lora_alpha": int(config.lora_alpha), "lora_dropout": float(config.lora_dropout),
            "bias": str(config.bias), "target_modules": sorted(config.target_modules)}


def widths_of(model) -> list[list[int]]:
    from slimflow.surgery import layer_widths

    return [[w.num_attention_heads, w.num_key_value_heads, w.intermediate_size] for w in layer_widths(model)]


def describe(pl_module: LightningModule, model_attr: str = "model") -> dict:
    """The `"slimflow"` checkpoint entry for the module's model as it is now."""
    model = get_model(pl_module, model_attr)
    return {"format": FORMAT, "model_attr": model_attr, "widths": widths_of(base_model(model)),
            "lora": lora_settings(model)}


def save_architecture(pl_module: LightningModule, checkpoint: dict, model_attr: str = "model") -> None:
    """Write the `"slimflow"` entry into a checkpoint being saved (the callbacks' `on_save_checkpoint`)."""
    checkpoint[KEY] = describe(pl_module, model_attr)


def restore_architecture(pl_module: LightningModule, checkpoint: dict) -> bool:
    """Reshape `pl_module`'s model to the architecture recorded in `checkpoint` before its weights load.

    A dense model is shrunk to the recorded widths (`slimflow.surgery.apply_widths`, keeping the leading units:
    the weights are overwritten by the load), and wrapped in PEFT LoRA with the recorded settings. A model that
    already has the recorded shape is left as it is, so calling this on the trained module itself is harmless.
    Inside a Trainer the slimflow callbacks then receive `on_architecture_restored`. Returns whether the
    checkpoint had a `"slimflow"` entry (a checkpoint without one needs nothing).
    """
    state = checkpoint.get(KEY)
    if not state:
        return False
    if state.get("format", FORMAT) > FORMAT:
        raise InvalidValueError(f"the checkpoint's slimflow entry has format {state['format']}; this slimflow reads "
                         f"format {FORMAT}: upgrade slimflow")
    from slimflow.api import record_widths
    from slimflow.surgery import LayerWidths, apply_widths

    attr = state.get("model_attr", "model")
    model = get_model(pl_module, attr)
    widths, lora = state["widths"], state.get("lora")
    if is_peft(model) and (lora_settings(model) != lora or widths_of(base_model(model)) != widths):
        model = model.unload()  # drop the adapter without merging: the checkpoint's weights replace it all
    base = base_model(model)
    if widths_of(base) != widths:
        try:
            apply_widths(base, [LayerWidths(*w) for w in widths])
        except ValueError as error:
            raise InvalidValueError(f"cannot rebuild the checkpoint's architecture on {type(pl_module).__name__}.{attr}: "
                             f"{error}. Restore into a freshly constructed (dense) module") from None
        record_widths(base, [LayerWidths(*w) for w in widths])
    if lora and not is_peft(model):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(**lora, task_type="CAUSAL_LM"))
    set_model(pl_module, attr, model)
    trainer = pl_module._trainer
    if trainer is not None:
        notify(trainer, "on_architecture_restored", pl_module, checkpoint)
    return True


def restore_known_checkpoint(trainer, pl_module: LightningModule) -> bool:
    """In a callback's `setup`: rebuild from the checkpoint this run will restore, if its path is known already.

    It is known only when `trainer.ckpt_path` was assigned before the call (the slimflow CLI does this). That is
    needed for strategies that restore checkpoints after their own setup (FSDP, DeepSpeed), where
    `on_load_checkpoint` comes too late to change shapes; elsewhere `on_load_checkpoint` does the work and this
    finds nothing to do.
    """
    from slimflow.lightning.access import resume_checkpoint

    checkpoint = resume_checkpoint(trainer)
    return checkpoint is not None and restore_architecture(pl_module, checkpoint)
