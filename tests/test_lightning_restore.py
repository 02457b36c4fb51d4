"""Lightning checkpoints of a pruned, LoRA-wrapped run restore the standard ways into a fresh module.

One short run per module kind (slimflow's `CausalLMModule` and a user's own module with the two-line
contract) on the tiny LLaMA of test_lightning.py; then every restore path is checked against the trained
module: `fit(ckpt_path=...)` (resume, with pruning forbidden), `validate(ckpt_path="best")`,
`test(ckpt_path="last")`, `test(ckpt_path=FILE)` in a plain Trainer without slimflow callbacks, and
`load_from_checkpoint`; plus a second `fit` of the trained module.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from slimflow.lightning import CausalLMModule, Calibration, LoRARecovery, RatioSchedule, StructuredPruning
from slimflow.lightning import restore_architecture
from test_lightning import assets  # noqa: F401  (fixture)


class OwnModule(pl.LightningModule):
    """A user's module: the model at `self.net`, its own loss and optimizer, and the two-line contract."""

    def __init__(self, model_dir: str, lr: float = 1e-3):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.save_hyperparameters()
        self.net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def on_load_checkpoint(self, checkpoint):
        restore_architecture(self, checkpoint)

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(**batch).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.net(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


KINDS = {
    "causal_lm": (lambda model_dir: CausalLMModule(model_dir, lr=1e-3, warmup_steps=1), "model", "ppl"),
    "own": (lambda model_dir: OwnModule(model_dir), "net", "loss"),
}


def batches(seed: int, n: int) -> DataLoader:
    ids = torch.randint(3, 300, (n, 24), generator=torch.Generator().manual_seed(seed))
    return DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=4)


def callbacks(attr: str, ckpt_dir: Path | None = None) -> list:
    found = [Calibration(source=ASSETS["text"], num_samples=8, seqlen=32),
             StructuredPruning(ratio=0.25, schedule=RatioSchedule("uniform"), model_attr=attr, progress=False),
             LoRARecovery(r=4, alpha=8, dropout=0.0, model_attr=attr)]
    if ckpt_dir is not None:
        found.append(ModelCheckpoint(dirpath=ckpt_dir, monitor=None, save_top_k=-1, save_last=True,
                                     filename="{epoch}"))
    return found


def trainer(root: Path, cbs: list, **kwargs) -> pl.Trainer:
    options = dict(default_root_dir=root, max_epochs=2, accelerator="cpu", logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**options, **kwargs}, callbacks=cbs)


ASSETS: dict = {}


@pytest.fixture(scope="module", params=sorted(KINDS))
def trained(request, assets, tmp_path_factory):  # noqa: F811
    ASSETS.update(assets)
    make, attr, metric = KINDS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cbs = callbacks(attr, root / "ckpt")
    best = ModelCheckpoint(dirpath=root / "best", monitor=f"val_{metric}", mode="min", save_top_k=1)
    run = trainer(root, [best] + cbs)  # the first ModelCheckpoint is what ckpt_path="best" uses
    module = make(assets["model"])
    run.fit(module, train_dataloaders=batches(1, 16), val_dataloaders=batches(2, 8))
    return dict(kind=request.param, make=make, attr=attr, metric=metric, root=root, trainer=run, module=module,
                best=best, last=str(root / "ckpt" / "last.ckpt"), epoch0=str(root / "ckpt" / "epoch=0.ckpt"))


def merged_state(module, attr: str) -> dict:
    model = getattr(module, attr)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


def no_pruning(monkeypatch):
    import slimflow.api

    def refuse(*args, **kwargs):
        raise AssertionError("restoring a checkpoint must rebuild the pruned widths, not prune again")

    monkeypatch.setattr(slimflow.api, "prune", refuse)


def test_checkpoint_records_the_architecture(trained):
    checkpoint = torch.load(trained["last"], map_location="cpu", weights_only=True)
    entry = checkpoint["slimflow"]
    assert entry["model_attr"] == trained["attr"] and entry["lora"]["r"] == 4
    from slimflow.surgery import layer_widths

    model = getattr(trained["module"], trained["attr"])
    assert entry["widths"] == [[w.num_attention_heads, w.num_key_value_heads, w.intermediate_size]
                               for w in layer_widths(model)]
    assert entry["widths"] != [[4, 4, 128]] * 3  # pruned


def test_load_from_checkpoint_into_a_fresh_module(trained):
    cls = type(trained["module"])
    restored = cls.load_from_checkpoint(trained["last"])
    assert_same_weights(merged_state(restored, trained["attr"]), merged_state(trained["module"], trained["attr"]))


def test_validate_best_and_test_last_on_fresh_modules(trained, monkeypatch):
    no_pruning(monkeypatch)
    run, metric, make = trained["trainer"], trained["metric"], trained["make"]
    scores = run.validate(make(ASSETS["model"]), dataloaders=batches(2, 8), ckpt_path="best", verbose=False)
    assert scores[0][f"val_{metric}"] == pytest.approx(float(trained["best"].best_model_score), rel=1e-5)

    expected = run.test(trained["module"], dataloaders=batches(3, 8), verbose=False)[0][f"test_{metric}"]
    got = run.test(make(ASSETS["model"]), dataloaders=batches(3, 8), ckpt_path="last", verbose=False)
    assert got[0][f"test_{metric}"] == pytest.approx(expected, rel=1e-5)

    plain = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False)
    got = plain.test(make(ASSETS["model"]), dataloaders=batches(3, 8), ckpt_path=trained["last"], verbose=False)
    assert got[0][f"test_{metric}"] == pytest.approx(expected, rel=1e-5)


def test_fit_resumes_from_a_checkpoint_without_pruning_again(trained, tmp_path, monkeypatch):
    no_pruning(monkeypatch)
    module = trained["make"](ASSETS["model"])
    run = trainer(tmp_path, callbacks(trained["attr"]), enable_checkpointing=False)
    run.fit(module, train_dataloaders=batches(1, 16), val_dataloaders=batches(2, 8), ckpt_path=trained["epoch0"])
    assert run.global_step == trained["trainer"].global_step
    assert_same_weights(merged_state(module, trained["attr"]), merged_state(trained["module"], trained["attr"]))


def test_second_fit_finetunes_again_without_pruning(trained, tmp_path, monkeypatch):
    from slimflow.surgery import count_parameters

    no_pruning(monkeypatch)
    module, attr = trained["module"], trained["attr"]
    before = merged_state(module, attr)
    params = count_parameters(getattr(module, attr))
    cbs = [cb for cb in trained["trainer"].callbacks if isinstance(cb, (Calibration, StructuredPruning, LoRARecovery))]
    trainer(tmp_path, cbs, max_epochs=1, enable_checkpointing=False).fit(module, train_dataloaders=batches(4, 8))
    after = merged_state(module, attr)
    assert before.keys() == after.keys() and count_parameters(getattr(module, attr)) == params
    assert not hasattr(getattr(module, attr), "peft_config")  # merged again
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_a_checkpoint_from_a_newer_slimflow_is_a_user_error():
    from slimflow.errors import SlimflowUserError
    from slimflow.lightning.restore import KEY, restore_architecture

    with pytest.raises(SlimflowUserError, match="upgrade slimflow"):
        restore_architecture(object(), {KEY: {"format": 10**6, "widths": []}})
