"""slimflow inside your own Lightning project: prune, LoRA-finetune, evaluate, export, then restore.

Your LightningModule keeps its own model attribute, loss, data and optimizer. slimflow needs two lines from
it (`on_load_checkpoint` below) so that its Lightning checkpoints restore into a freshly built module the
standard ways. Runs from the repository root, by default on the shared 27M reference model (a few minutes
on a 2-core CPU; CI runs it on a tiny model, see tests/test_examples.py):

    python3 examples/own_lightning_project.py                      # defaults below
    python3 examples/own_lightning_project.py --root runs/mine --ratio 0.3 --steps 20

See docs/lightning.md for the contract, the hook order and what the checkpoint holds.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from slimflow.lightning import (
    Calibration, Evaluation, Export, LoRARecovery, RatioSchedule, StructuredPruning, restore_architecture,
)

MODEL = "../shared/models/ref-llama-27m"
TRAIN_TEXT = "../shared/pretrain_corpus/part-000.txt.gz"  # finetuning text
HELD_OUT = "../shared/pretrain_corpus/part-007.txt.gz"  # calibration (after 400k tokens) and evaluation only


class MyLM(pl.LightningModule):
    """Your module: the Hugging Face model lives at `self.lm`, not at slimflow's default `model`."""

    def __init__(self, model_dir: str, lr: float = 1e-3):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.save_hyperparameters()  # load_from_checkpoint rebuilds the module from these
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.lm.train()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # The two lines slimflow asks for: rebuild the pruned widths and the LoRA wrapping recorded in the
    # checkpoint before Lightning loads its weights (the only hook that runs that early).
    def on_load_checkpoint(self, checkpoint):
        restore_architecture(self, checkpoint)

    def training_step(self, batch, batch_idx):
        loss = self.lm(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.lm(input_ids=batch, labels=batch).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.lm(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):  # only what requires grad: LoRA freezes the pruned weights
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def windows(tokenizer, path: str, train: int, val: int, seqlen: int) -> tuple[DataLoader, DataLoader]:
    """Consecutive token windows of `seqlen` from the start of a text file: `train` of them, then `val`."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read((train + val) * seqlen * 8)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: (train + val) * seqlen].view(train + val, seqlen)
    return DataLoader(list(ids[:train]), batch_size=4), DataLoader(list(ids[train:]), batch_size=4)


def make_trainer(root: Path, max_epochs: int, ratio: float, held_out: str, skip_tokens: int,
                 seqlen: int) -> pl.Trainer:
    attr = "lm"  # every slimflow callback is told where the model lives
    return pl.Trainer(
        default_root_dir=root, max_epochs=max_epochs, accelerator="cpu", log_every_n_steps=1,
        logger=CSVLogger(root, name="logs"), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=root / "checkpoints", monitor="val_loss", save_last=True),
            Calibration(source=held_out, num_samples=8, seqlen=seqlen, skip_tokens=skip_tokens),
            StructuredPruning(ratio=ratio, schedule=RatioSchedule("log_increase"), model_attr=attr),
            LoRARecovery(r=8, alpha=16, dropout=0.0, model_attr=attr),
            Evaluation(ppl=[f"{held_out}:{seqlen}"], max_tokens=skip_tokens or None, max_windows=16, samples=0,
                       model_attr=attr),
            Export(model_attr=attr),
        ],
    )


def main(root: str = "runs/own_lightning_project", model: str = MODEL, train_text: str = TRAIN_TEXT,
         held_out: str = HELD_OUT, skip_tokens: int = 400_000, ratio: float = 0.2, steps: int = 8,
         seqlen: int = 128, seed: int = 0) -> dict:
    """Prune `ratio` of the model, finetune `steps` LoRA steps per epoch, then restore the run four ways.

    Args:
        root: run directory (checkpoints, logs, metrics.json, pruning report, export/).
        model: Hugging Face model directory or hub id (with its tokenizer).
        train_text: text (.txt or .txt.gz) the LoRA finetuning reads.
        held_out: text for calibration (after its first `skip_tokens` tokens) and perplexity (before them).
        skip_tokens: held-out tokens kept for evaluation (0: calibrate and evaluate on the whole text).
        ratio: fraction of all parameters to remove.
        steps: optimizer steps per epoch (batches of 4 windows).
        seqlen: tokens per window.
        seed: seed of everything.
    """
    pl.seed_everything(seed)
    root = Path(root)
    module = MyLM(model)
    train, val = windows(module.tokenizer, train_text, 4 * steps, 8, seqlen)
    settings = dict(ratio=ratio, held_out=held_out, skip_tokens=skip_tokens, seqlen=seqlen)

    # 1. one epoch: calibrate -> prune -> LoRA finetune -> evaluate -> export (metrics also in logs/)
    trainer = make_trainer(root, max_epochs=1, **settings)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    trained_loss = trainer.validate(module, dataloaders=val, verbose=False)[0]["val_loss"]

    # 2. restore into fresh (dense) modules, the standard Lightning ways; nothing is pruned again
    best = trainer.test(MyLM(model), dataloaders=val, ckpt_path="best", verbose=False)[0]["test_loss"]
    loaded = MyLM.load_from_checkpoint(root / "checkpoints" / "last.ckpt")
    plain = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False)
    reloaded_loss = plain.validate(loaded, dataloaders=val, verbose=False)[0]["val_loss"]

    # 3. resume: one more epoch from the last checkpoint, with the same callbacks, in a new Trainer
    resumed = make_trainer(root, max_epochs=2, **settings)
    resumed.fit(MyLM(model), train_dataloaders=train, val_dataloaders=val,
                ckpt_path=root / "checkpoints" / "last.ckpt")

    results = {"trained_val_loss": trained_loss, "best_test_loss": best, "load_from_checkpoint_val_loss": reloaded_loss,
               "resumed_global_step": resumed.global_step,
               "summary": next(cb for cb in resumed.callbacks if isinstance(cb, Evaluation)).summary()}
    print(f"val loss: trained {trained_loss:.4f} | load_from_checkpoint {reloaded_loss:.4f} | best checkpoint "
          f"{best:.4f}; resumed to step {resumed.global_step}; exported to {root / 'export' / 'model'}")
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
