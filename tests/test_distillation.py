"""Recovery by distillation: the KL loss against float64, the teacher's lifetime, a tiny distilled LoRA fit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import yaml

from slimflow.algorithms.distillation import distillation_kl
from slimflow.lightning import LoRARecovery
from slimflow.lightning.data import InstructionData
from slimflow.lightning.module import CausalLMModule
from test_lightning import assets  # noqa: F401 - the shared tiny model / Alpaca / text fixture


def kl_float64(student, teacher, temperature, mask):
    s, t = student.double() / temperature, teacher.double() / temperature
    log_ps, log_pt = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (per_token * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_matches_float64(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    got = distillation_kl(student, teacher, temperature, mask)
    assert torch.allclose(got.double(), kl_float64(student, teacher, temperature, mask), rtol=1e-5, atol=1e-6)
    assert torch.allclose(distillation_kl(student, teacher, temperature).double(),
                          kl_float64(student, teacher, temperature, torch.ones(3, 7)), rtol=1e-5, atol=1e-6)
    assert float(distillation_kl(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)
    # the gradient pulls the student towards the teacher: one step lowers the loss
    student = student.clone().requires_grad_(True)
    distillation_kl(student, teacher, temperature, mask).backward()
    with torch.no_grad():
        assert distillation_kl(student - 0.5 * student.grad, teacher, temperature, mask) < got


def test_kl_rejects_mismatched_vocab_and_bad_temperature():
    with pytest.raises(ValueError, match="share the tokenizer"):
        distillation_kl(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)


def perturbed_student(assets, root) -> str:  # noqa: F811
    """The tiny teacher with noise on every matrix: a student with a real gap to close."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 1.5)
    model.save_pretrained(root / "student")
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(root / "student")
    return str(root / "student")


@torch.no_grad()
def kl_to_teacher(student, teacher, windows, temperature) -> float:
    return float(distillation_kl(student(input_ids=windows).logits, teacher(input_ids=windows).logits, temperature))


@pytest.mark.parametrize("lm_weight", [0.0, 1.0])
def test_distilled_lora_fit_lowers_the_kl_and_frees_the_teacher(assets, tmp_path, lm_weight):  # noqa: F811
    from transformers import AutoModelForCausalLM

    student_dir = perturbed_student(assets, tmp_path)
    data = InstructionData(path=assets["alpaca"], tokenizer=student_dir, val_size=8, batch_size=4, cutoff_len=256,
                           distill_text=assets["text"], distill_seqlen=32, seed=0)
    module = CausalLMModule(student_dir, lr=1e-2, warmup_steps=1, teacher=assets["model"], lm_weight=lm_weight,
                            distill_weight=1.0, distill_temperature=2.0)
    module.configure_model()
    teacher = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    data.setup("fit")
    windows = torch.stack([e["distill_input_ids"] for e in data.train_set[:8]])
    before = kl_to_teacher(module.model.eval(), teacher, windows, 2.0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=3, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LoRARecovery(r=4, alpha=8, dropout=0.0)])
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["teacher"] = pl_module._teacher[0] is not None
            seen["in_state"] = any("teacher" in k for k in pl_module.state_dict())
            seen["trainable_teacher"] = any(p.requires_grad for p in pl_module._teacher[0].parameters())

    trainer.callbacks.append(Watch())
    trainer.fit(module, datamodule=data)
    after = kl_to_teacher(module.model.eval(), teacher, windows, 2.0)
    assert seen == {"teacher": True, "in_state": False, "trainable_teacher": False}
    assert module._teacher[0] is None  # freed at fit end
    # alone it closes much of the gap; mixed with the Alpaca loss (which pulls elsewhere) it still narrows it
    assert after < (0.8 if lm_weight == 0 else 1.0) * before, (before, after)


def test_distillation_without_text_fails_with_the_fix(assets, tmp_path):  # noqa: F811
    data = InstructionData(path=assets["alpaca"], tokenizer=assets["model"], val_size=8, batch_size=4, cutoff_len=256)
    module = CausalLMModule(assets["model"], distill_weight=1.0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module.configure_model()
    with pytest.raises(ValueError, match="distill_text"):
        trainer.fit(module, datamodule=data)
    assert module._teacher[0] is None  # freed on the failure too
    with pytest.raises(ValueError, match="not both 0"):
        CausalLMModule(assets["model"], lm_weight=0.0)


def test_distillation_options_in_print_config(capsys, monkeypatch):
    from pathlib import Path

    from slimflow.cli import main as slimflow_main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert slimflow_main(["fit", "--config", "configs/demo.yaml", "--print_config", "--model.init_args.distill_weight",
                          "0.5", "--data.init_args.distill_text", "../shared/pretrain_corpus/part-007.txt.gz"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["distill_weight"] == 0.5
    assert config["model"]["init_args"]["distill_temperature"] == 2.0
    assert config["data"]["init_args"]["distill_text"].endswith("part-007.txt.gz")
