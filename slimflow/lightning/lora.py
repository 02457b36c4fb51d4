"""LoRA recovery: PEFT LoRA injected after each prune, merged before the next prune and at the end of training."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from torch import nn

from slimflow.lightning.access import SlimflowCallback, get_model, notify, set_model, slimflow_callbacks
from slimflow.lightning.logs import say
from slimflow.lightning.restore import is_peft, restore_known_checkpoint, save_architecture
from slimflow.errors import InvalidValueError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRARecovery(SlimflowCallback):
    """Trains a PEFT LoRA adapter on the pruned model (the pruned weights stay frozen).

    LoRA wraps each Linear at its own (pruned) shape. It is injected right after each prune (or in `setup`
    when no prune is to come: no `StructuredPruning`, or a further `fit` of a pruned module), rebuilt from the
    checkpoint on resume (`slimflow.lightning.restore`), and merged into the weights (`merge_and_unload`)
    before a later prune and in `on_train_end`, so evaluation and export see the merged model. `Export` saves
    the adapter itself just before the final merge.

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (`lora_alpha`).
        dropout: dropout on the LoRA input.
        target_modules: names (last path component) of the Linear modules that get an adapter.
        bias: PEFT bias mode (`none`, `all`, `lora_only`).
        merge: merge the adapter into the weights at the end of training.
        model_attr: attribute of the LightningModule holding the Hugging Face model.
    """

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: list[str] | None = None,
                 bias: str = "none", merge: bool = True, model_attr: str = "model"):
        self.r, self.alpha, self.dropout, self.bias, self.merge = r, alpha, dropout, bias, merge
        self.target_modules = list(target_modules or DEFAULT_TARGETS)
        self.model_attr = model_attr
        self.injected = False
        self.merges = 0

    def check(self, trainer, pl_module, model) -> None:
        names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in self.target_modules if t not in names]
        if missing:
            raise InvalidValueError(f"LoRA target_modules {missing} match no Linear module of the model; "
                             f"its Linear modules are named {sorted(names)}")
        if self.r < 1:
            raise InvalidValueError(f"LoRA rank r must be >= 1, got {self.r}")

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=self.bias,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")

    def inject(self, pl_module: LightningModule) -> None:
        from peft import get_peft_model

        model = get_model(pl_module, self.model_attr)
        set_model(pl_module, self.model_attr, get_peft_model(model, self.lora_config()))
        self.injected = True

    def merge_now(self, trainer: Trainer, pl_module: LightningModule, final: bool) -> None:
        peft_model = get_model(pl_module, self.model_attr)
        notify(trainer, "on_before_merge", pl_module, peft_model, final)
        set_model(pl_module, self.model_attr, peft_model.merge_and_unload())
        self.injected = False
        self.merges += 1

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from slimflow.lightning.pruning import StructuredPruning

        restore_known_checkpoint(trainer, pl_module)
        self.injected = is_peft(get_model(pl_module, self.model_attr))  # this module, whatever came before
        if stage != "fit" or self.injected:
            return
        if any(p.pending() for p in slimflow_callbacks(trainer, StructuredPruning)):
            return  # the prune injects (on_stage_start), or a restored checkpoint does (on_architecture_restored)
        # No prune to come (LoRA alone, or a further fit of an already pruned module): finetune a fresh adapter.
        self.check(trainer, pl_module, get_model(pl_module, self.model_attr))
        self.inject(pl_module)

    def on_stage_start(self, trainer, pl_module, stage) -> None:
        self.inject(pl_module)

    def on_stage_end(self, trainer, pl_module, stage) -> None:
        if self.injected:
            self.merge_now(trainer, pl_module, final=False)

    def on_architecture_restored(self, trainer, pl_module, checkpoint) -> None:
        self.injected = is_peft(get_model(pl_module, self.model_attr))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        save_architecture(pl_module, checkpoint, self.model_attr)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.injected:
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            say(trainer, f"finetuning LoRA (r {self.r}, {trainable:,} trainable parameters) for "
                         f"{int(trainer.estimated_stepping_batches)} optimizer steps from step {trainer.global_step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from slimflow.lightning.distributed import is_sharded

        if not is_sharded(trainer):  # sharded: merged on rank 0 once the weights are gathered (on_fit_end)
            self.final_merge(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from slimflow.lightning.distributed import gather_full_model

        gather_full_model(trainer, pl_module, self.model_attr)

    def final_merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.injected and self.merge:
            self.merge_now(trainer, pl_module, final=True)

    def state_dict(self) -> dict:
        return {"injected": int(self.injected), "merges": self.merges, "r": self.r,
                "target_modules": self.target_modules}

    def load_state_dict(self, state_dict: dict) -> None:
        self.merges = state_dict.get("merges", 0)
