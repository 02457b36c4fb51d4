"""`CausalLMModule`: causal-LM finetuning of a Hugging Face model (AdamW, warmup + cosine, perplexity)."""

from __future__ import annotations

import gc
import math

import torch
from lightning.pytorch import LightningModule
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.text import Perplexity

from slimflow.algorithms.distillation import distillation_kl
from slimflow.lightning.restore import restore_architecture
from slimflow.errors import InvalidValueError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class CausalLMModule(LightningModule):
    """Finetunes a Hugging Face causal LM on batches of `input_ids` / `attention_mask` / `labels`.

    The model is loaded lazily in `configure_model` (slimflow callbacks trigger it in their `setup`), as float32
    by default; use the Trainer's `precision: bf16-mixed` for mixed precision where the hardware has it.
    Validation and test report `val_ppl` / `test_ppl` (torchmetrics `Perplexity`, ignoring label -100); batches
    without `labels` are scored on all their tokens (held-out text windows). Checkpoints of a pruned and
    LoRA-wrapped run restore into a fresh module (`load_from_checkpoint`, `Trainer(...).test(ckpt_path=...)`):
    `on_load_checkpoint` rebuilds the recorded architecture first (`slimflow.lightning.restore`).

    Args:
        pretrained: Hugging Face hub id or local directory of the model (and its tokenizer); slimflow pruned
            checkpoints and exports load at their per-layer widths (no remote code runs). Loaded by
            `slimflow.models.load_model`, like every model in slimflow.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup.
        min_lr_ratio: final learning rate as a fraction of `lr` (cosine decay).
        dtype: dtype the weights are loaded in (`float32`, `bfloat16`, `float16`).
        gradient_checkpointing: trade compute for activation memory.
        attn_implementation: transformers attention backend (`sdpa`, `eager`, ...); default: transformers' choice.
        lm_weight: weight of the next-token cross-entropy on `labels` (0 skips it).
        distill_weight: weight of the distillation KL on `distill_input_ids` (0: no teacher is loaded).
        distill_temperature: softmax temperature T of the distillation KL (the loss is scaled by T²).
        teacher: directory or hub id of the teacher (default: `pretrained`, the model before pruning); a
            slimflow pruned checkpoint works too.
        teacher_dtype: dtype the teacher is loaded in (default: `dtype`).
    """

    def __init__(self, pretrained: str, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 100, min_lr_ratio: float = 0.0,
                 dtype: str = "float32", gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 lm_weight: float = 1.0, distill_weight: float = 0.0, distill_temperature: float = 2.0,
                 teacher: str | None = None, teacher_dtype: str | None = None):
        super().__init__()
        from slimflow.models import check_model_source, load_tokenizer

        check_model_source(pretrained)  # a local-looking path must be a model directory (never sent to the hub)
        if teacher is not None:
            check_model_source(teacher)
        if dtype not in DTYPES:
            raise InvalidValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if teacher_dtype is not None and teacher_dtype not in DTYPES:
            raise InvalidValueError(f"teacher_dtype must be one of {', '.join(DTYPES)}, got {teacher_dtype!r}")
        if lm_weight < 0 or distill_weight < 0 or lm_weight + distill_weight == 0:
            raise InvalidValueError(f"lm_weight ({lm_weight}) and distill_weight ({distill_weight}) must be >= 0 and "
                             "not both 0; set distill_weight > 0 to distil, lm_weight > 0 for the next-token loss")
        if distill_temperature <= 0:
            raise InvalidValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(pretrained, pad_with_eos=False)  # written into the export as shipped
        self.model = None
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)
        self._teacher: list = [None]  # a list keeps the teacher out of the module's children and checkpoints

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from slimflow.models import load_model

        hp = self.hparams
        # slimflow's one loader: pruned checkpoints are rebuilt at their widths, dense ones load as usual
        self.model = load_model(hp.pretrained, dtype=DTYPES[hp.dtype], device="cpu",
                                attn_implementation=hp.attn_implementation)
        self.model.train()  # load_model returns eval mode; Lightning keeps modules' modes as they are
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.enable_input_require_grads()

    def forward(self, **batch):
        return self.model(**batch)

    # ------------------------------------------------------------------------------------------ teacher
    @property
    def teacher_model(self):
        """The frozen dense teacher (loaded on first use; None without distillation)."""
        hp = self.hparams
        if hp.distill_weight > 0 and self._teacher[0] is None:
            from slimflow.models import load_model

            # the same loader as the student: a slimflow pruned checkpoint is a valid teacher too
            teacher = load_model(hp.teacher or hp.pretrained, dtype=DTYPES[hp.teacher_dtype or hp.dtype],
                                 device=self.device)
            self._teacher[0] = teacher.requires_grad_(False).eval()
        return self._teacher[0]

    def release_teacher(self) -> None:
        if self._teacher[0] is not None:
            self._teacher[0] = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def on_fit_start(self) -> None:
        self.teacher_model  # noqa: B018 - load it now, on the training device, before the first step

    def on_fit_end(self) -> None:
        self.release_teacher()

    # ----------------------------------------------------------------------------------------- training
    def distillation_loss(self, batch: dict) -> torch.Tensor:
        ids = batch.get("distill_input_ids")
        if ids is None:
            raise InvalidValueError("distill_weight > 0 needs training batches with `distill_input_ids`: give the data "
                             "a distillation text (e.g. InstructionData distill_text: path/to/text.txt.gz)")
        mask = batch.get("distill_attention_mask")
        student = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with torch.no_grad():
            teacher = self.teacher_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return distillation_kl(student, teacher, self.hparams.distill_temperature, mask)

    def training_step(self, batch: dict, batch_idx: int):
        hp = self.hparams
        lm_batch = {k: v for k, v in batch.items() if not k.startswith("distill_")}
        size = batch["input_ids"].shape[0]
        loss = 0.0
        if hp.lm_weight > 0:
            lm = self.model(**lm_batch, use_cache=False).loss
            loss = hp.lm_weight * lm
            if hp.distill_weight > 0:
                self.log("train_lm_loss", lm, batch_size=size)
        if hp.distill_weight > 0:
            try:
                kd = self.distillation_loss(batch)
            except BaseException:
                self.release_teacher()  # a failed fit does not keep the teacher (the module gets no on_exception)
                raise
            loss = loss + hp.distill_weight * kd
            self.log("train_distill_kl", kd, prog_bar=True, batch_size=size)
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _score(self, batch: dict, metric: Perplexity, name: str) -> None:
        labels = batch.get("labels", batch["input_ids"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self.model(**inputs, use_cache=False).logits[:, :-1].float()
        metric.update(logits, labels[:, 1:])
        self.log(name, metric, prog_bar=True, batch_size=labels.shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch, self.val_ppl, "val_ppl")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch, self.test_ppl, "test_ppl")

    def _schedule_steps(self) -> int:
        """Optimizer steps this optimizer lives for: to the next prune event of a slimflow pruning callback
        (each stage of an iterative recipe gets its own warmup and cosine), else to the end of training."""
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        for callback in trainer.callbacks:
            span = getattr(callback, "stage_steps", None)
            if span is not None and (steps := span(trainer)) is not None:
                return steps
        return total

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        scheduler = LambdaLR(optimizer, warmup_cosine(hp.warmup_steps, self._schedule_steps(), hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # RNG state (dropout) so that a resumed run continues exactly like an uninterrupted one
        checkpoint["slimflow_rng"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["slimflow_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_architecture(self, checkpoint)  # pruned widths and LoRA wrapping, before the weights load
        rng = checkpoint.get("slimflow_rng")
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
