"""slimflow's Lightning callbacks in a user's own LightningModule, export reloading and early errors.

Everything runs on a tiny LLaMA (3 layers, hidden 64) with a tiny BPE tokenizer trained here, so the whole
file takes seconds. `tiny_assets` is shared with test_lightning_cli.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import HELD_OUT_TEXT, require_shared
from slimflow.lightning import Calibration, Evaluation, Export, LoRARecovery, RatioSchedule, StructuredPruning

ALPACA = HELD_OUT_TEXT.parents[1] / "data" / "alpaca" / "alpaca_5000.json"
_ASSETS: dict = {}


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_assets(root: Path) -> dict:
    """A tiny LLaMA + tokenizer directory, a 48-record Alpaca file and a held-out text file (built once)."""
    if _ASSETS:
        return _ASSETS
    require_shared(ALPACA)
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    records = json.loads(ALPACA.read_text())[:48]
    with gzip.open(HELD_OUT_TEXT, "rt", encoding="utf-8") as f:
        text = f.read(60_000)
    tokenizer = _train_tokenizer([text] + [r["instruction"] + r["input"] + r["output"] for r in records])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "alpaca.json").write_text(json.dumps(records))
    (root / "text.txt").write_text(text)
    _ASSETS.update(model=str(root / "model"), alpaca=str(root / "alpaca.json"), text=str(root / "text.txt"))
    return _ASSETS


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("tiny"))


# ------------------------------------------------------------------------------------------ a user's project
class UserModule(pl.LightningModule):
    """A user's own module: the HF model lives at `self.net`, no slimflow base class."""

    def __init__(self, model_dir: str):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def user_batches(model_dir: str, n: int = 16, seqlen: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (n, seqlen), generator=generator)
    return DataLoader(list(ids), batch_size=4)


def test_user_module_gains_pruning_lora_eval_export(assets, tmp_path, capsys):
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from peft import PeftModel

    from slimflow.checkpoint import load_pruned
    from slimflow.surgery import count_parameters

    module = UserModule(assets["model"])
    dense_params = count_parameters(module.net)
    spec = f"{assets['text']}:32"
    callbacks = [
        Export(model_attr="net"),
        Evaluation(ppl=[spec], max_windows=8, samples=2, sample_tokens=5, model_attr="net"),
        LoRARecovery(r=4, alpha=8, dropout=0.0, model_attr="net"),
        StructuredPruning(ratio=0.2, schedule=RatioSchedule("uniform"), model_attr="net"),
        Calibration(source=assets["text"], num_samples=8, seqlen=32, generated_samples=4),
    ]  # deliberately out of order: the callbacks coordinate through events, not list order
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu",
                         logger=CSVLogger(tmp_path, name="logs"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=user_batches(assets["model"]))
    printed = capsys.readouterr()
    assert "slimflow: pruning 20%" in printed.out and "slimflow: pruned: perplexity" in printed.out
    assert "pruning layers" not in printed.err  # enable_progress_bar=False: status lines, no bars

    settings = callbacks[3].last_report["settings"]  # 8 drawn + 4 sampled from the model
    assert (settings["num_samples"], settings["generated_samples"]) == (8, 4)
    assert not isinstance(module.net, PeftModel)  # LoRA merged at the end
    params = count_parameters(module.net)
    assert abs(params / dense_params - 0.8) < 0.02
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    s = metrics["summary"]
    assert s["dense"]["parameters"] == dense_params and s["pruned"]["parameters"] == params
    assert s["finetuned"]["parameters"] == params and s["dense"]["ppl"] < s["pruned"]["ppl"]
    assert (tmp_path / "pruning_report.md").read_text().count("→") > 0 and (tmp_path / "pruning_widths.png").is_file()
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert len(samples) == 2 and all(set(row) == {"prompt", "dense", "pruned", "finetuned"} for row in samples)
    assert "**finetuned:**" in (tmp_path / "samples.md").read_text()

    # the exported merged model is the trained one; base + adapter rebuild it
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    module.net.eval()
    with torch.no_grad():
        expected = module.net(input_ids=ids).logits
        reloaded = load_pruned(tmp_path / "export" / "model")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        rebuilt = PeftModel.from_pretrained(load_pruned(tmp_path / "export" / "base"), tmp_path / "export" / "adapter")
        torch.testing.assert_close(rebuilt.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert metrics["finetuned"]["perplexity"][spec]["value"] == pytest.approx(s["finetuned"]["ppl"])

    # the same numbers went through the Trainer's logger
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    for name in ("dense", "pruned", "finetuned"):
        assert logged[f"eval/{name}/ppl"] == pytest.approx(s[name]["ppl"])
        assert logged[f"eval/{name}/parameters"] == s[name]["parameters"]
    pruning = json.loads((tmp_path / "pruning.json").read_text())["reports"][0]
    assert logged["pruning/params_before"] == dense_params and logged["pruning/params_after"] == params
    assert logged["pruning/realised_fraction"] == pytest.approx(pruning["realised_fraction"])
    for layer in pruning["layers"]:
        assert logged[f"pruning/layer_{layer['index']}/ffn_error"] == pytest.approx(layer["ffn_error"])
        assert logged[f"pruning/layer_{layer['index']}/attn_heads"] == layer["widths"]["num_attention_heads"]


def test_pruning_progress_bars_follow_the_trainer(assets, tmp_path, capsys):
    callbacks = [Calibration(source=assets["text"], num_samples=4, seqlen=32),
                 StructuredPruning(ratio=0.2, schedule=RatioSchedule("uniform"), model_attr="net")]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(UserModule(assets["model"]), train_dataloaders=user_batches(assets["model"]))
    printed = capsys.readouterr()
    assert "pruning layers" in printed.err and "slimflow: pruned in" in printed.out


def test_the_adaptive_schedule_samples_from_the_model_by_default(assets, tmp_path):
    callbacks = [StructuredPruning(ratio=0.2, schedule=RatioSchedule("adaptive", options={"search": False}),
                                   model_attr="net"),
                 Calibration(source=assets["text"], num_samples=8, seqlen=32)]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(UserModule(assets["model"]), train_dataloaders=user_batches(assets["model"]))
    settings = callbacks[0].last_report["settings"]
    assert (settings["num_samples"], settings["generated_samples"]) == (8, 256)


def test_the_adaptive_search_of_the_callback_scores_on_other_windows_of_the_source(assets, tmp_path):
    callbacks = [StructuredPruning(ratio=0.2, schedule=RatioSchedule("adaptive"), model_attr="net"),
                 Calibration(source=assets["text"], num_samples=8, seqlen=32, generated_samples=0)]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(UserModule(assets["model"]), train_dataloaders=user_batches(assets["model"]))
    allocation = callbacks[0].last_report["settings"]["allocation"]
    search = allocation["search"]
    expected = callbacks[1].data.scoring_ids()
    assert search["score_on"] == "source" and search["split"] == [8, expected.shape[0]] and allocation["measured_rows"] == 8
    rows = callbacks[1].data.ids()
    assert not {tuple(r) for r in expected.tolist()} & {tuple(r) for r in rows.tolist()}


def test_lora_only_without_pruning(assets, tmp_path):
    """LoRARecovery alone (no StructuredPruning) injects in setup and merges at the end."""
    module = UserModule(assets["model"])
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LoRARecovery(r=2, alpha=4, dropout=0.0, model_attr="net")])
    trainer.fit(module, train_dataloaders=user_batches(assets["model"]))
    after = module.net.state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------ early errors
def _fit_expecting(error, match, assets, tmp_path, monkeypatch, **pruning):
    import slimflow.api

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruning must not start when the configuration is invalid")

    monkeypatch.setattr(slimflow.api, "prune", no_pruning)
    lora = pruning.pop("lora", {})
    callbacks = [Calibration(source=assets["text"], num_samples=4, seqlen=32),
                 StructuredPruning(model_attr="net", progress=False, **pruning),
                 LoRARecovery(model_attr="net", **lora)]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=callbacks)
    with pytest.raises(error, match=match):
        trainer.fit(UserModule(assets["model"]), train_dataloaders=user_batches(assets["model"]))


def test_lora_targets_matching_nothing_fail_before_pruning(assets, tmp_path, monkeypatch):
    _fit_expecting(ValueError, "q_prj", assets, tmp_path, monkeypatch, ratio=0.2,
                   lora={"target_modules": ["q_prj", "v_proj"]})


def test_impossible_ratio_fails_before_pruning(assets, tmp_path, monkeypatch):
    _fit_expecting(ValueError, "prunable parameters|every head", assets, tmp_path, monkeypatch, ratio=0.9)


def test_prune_epoch_beyond_training_fails(assets, tmp_path, monkeypatch):
    _fit_expecting(ValueError, "max_epochs", assets, tmp_path, monkeypatch, ratio=[0.2, 0.3], at_epochs=[0, 3])


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="increase"):
        StructuredPruning(ratio=[0.3, 0.2], at_epochs=[0, 1])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Calibration(source="../no/such/missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Evaluation(ppl=["../no/such/missing.txt:128"])


def test_causal_lm_module_finetunes_a_slimflow_export(assets, tmp_path):
    """`CausalLMModule(pretrained=<pruned checkpoint>)` loads it at its widths and trains it (stock
    `from_pretrained` cannot build the narrower layers)."""
    import slimflow
    from slimflow.checkpoint import load_pruned, save_pruned
    from slimflow.lightning.module import CausalLMModule
    from slimflow.models import load_model, load_tokenizer
    from slimflow.surgery import layer_widths

    model = load_model(assets["model"], dtype="float32", device="cpu")
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(2))
    slimflow.prune(model, ids, 0.25, schedule="uniform", progress=False)
    export = save_pruned(model, tmp_path / "pruned", tokenizer=load_tokenizer(assets["model"]))
    module = CausalLMModule(pretrained=str(export), lr=1e-3, warmup_steps=0)
    batches = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=batches)
    assert layer_widths(module.model) == layer_widths(model)
    before = load_pruned(export)
    changed = [not torch.equal(a, b) for a, b in zip(module.model.parameters(), before.parameters())]
    assert any(changed)


def test_causal_lm_module_distils_from_a_pruned_teacher(assets, tmp_path):
    """`teacher=<pruned checkpoint>` loads through the same loader as the student, at its widths (stock
    `from_pretrained` refuses the directory), and the distillation KL trains the student towards it."""
    import slimflow
    from slimflow.checkpoint import save_pruned
    from slimflow.lightning.module import CausalLMModule
    from slimflow.models import load_model, load_tokenizer
    from slimflow.surgery import layer_widths

    model = load_model(assets["model"], dtype="float32", device="cpu")
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(2))
    slimflow.prune(model, ids, 0.25, schedule="uniform", progress=False)
    teacher = save_pruned(model, tmp_path / "teacher", tokenizer=load_tokenizer(assets["model"]))
    student = load_model(assets["model"], dtype="float32", device="cpu")  # dense, with a real gap to close
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * p.std())
    student.save_pretrained(tmp_path / "student")
    load_tokenizer(assets["model"]).save_pretrained(tmp_path / "student")
    module = CausalLMModule(pretrained=str(tmp_path / "student"), teacher=str(teacher), lr=1e-3, warmup_steps=0,
                            lm_weight=0.0, distill_weight=1.0)
    batches = DataLoader([{"input_ids": row, "labels": row, "distill_input_ids": row} for row in ids], batch_size=4)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("widths", layer_widths(pl_module.teacher_model))
            seen.setdefault("kl", []).append(float(outputs["loss"]))

    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cpu", logger=False, callbacks=[Probe()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=batches)
    assert seen["widths"] == layer_widths(model) != layer_widths(module.model)
    assert seen["kl"][2] < seen["kl"][0]  # the same batch, two steps later
