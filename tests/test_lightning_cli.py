"""`slimflow fit|validate|test` (LightningCLI) with the shipped configs, retargeted at a tiny model:
--print_config, resume without re-pruning, the iterative recipe, the run directory and config errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from slimflow.cli import main as slimflow_main
from test_lightning import assets  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


class Crash(Callback):
    """Simulates a run killed at the start of epoch `epoch` (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated kill")


class MidEpochCrash(Callback):
    """Simulates a run killed during finetuning, at optimizer step 7 of the demo's 10-step epoch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 7:
            raise RuntimeError("simulated kill")


def tiny_config(name: str, assets: dict, run: Path, extra_callbacks=(), batch_size: int = 4, **trainer) -> Path:
    """configs/NAME retargeted at the tiny model and data; returns the written config path. With
    `batch_size=1` an epoch of the tiny data has the demo's 10 optimizer steps (40 records, accumulation 4)."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config["trainer"].update(default_root_dir=str(run), **trainer)
    for cb in config["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        kind = cb["class_path"].rsplit(".", 1)[-1]
        if kind == "Calibration":
            args.update(source=assets["text"], num_samples=8, seqlen=32, skip_tokens=0)
        elif kind == "Evaluation":
            args.update(ppl=[f"{assets['text']}:32"], max_windows=8, max_tokens=None)
        elif kind == "LoRARecovery":
            args.update(r=4, alpha=8)
        elif kind == "ModelCheckpoint" and batch_size != 1:
            args.pop("every_n_train_steps", None)  # shorter epochs than the demo's: checkpoint at epoch ends
    config["trainer"]["callbacks"] += [{"class_path": c} for c in extra_callbacks]
    config["model"]["init_args"].update(pretrained=assets["model"], warmup_steps=2)
    config["data"]["init_args"].update(path=assets["alpaca"], limit=None, val_size=8, batch_size=batch_size,
                                       eval_batch_size=8, cutoff_len=256)
    path = run.parent / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *args: str) -> None:
    assert slimflow_main(["fit", "--config", str(config), *args]) == 0


def test_print_config_is_commented_and_runnable(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert slimflow_main(["fit", "--config", "configs/demo.yaml", "--print-config"]) == 0
    printed = capsys.readouterr().out
    if importlib.util.find_spec("ruamel"):  # jsonargparse writes the option docs as comments with ruamel.yaml
        assert "# " in printed and "Alpaca" in printed
    config = yaml.safe_load(printed)
    assert config["trainer"]["callbacks"][1]["init_args"]["ratio"] == 0.2
    (tmp_path / "printed.yaml").write_text(printed)
    assert slimflow_main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config",
                          "--model.init_args.lr", "0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["lr"] == 0.5


def test_resume_does_not_prune_again_and_matches_uninterrupted(assets, tmp_path, monkeypatch):  # noqa: F811
    import slimflow.api
    from slimflow.checkpoint import load_pruned

    fit(tiny_config("demo.yaml", assets, tmp_path / "straight", batch_size=1, max_epochs=2))
    crashed = tiny_config("demo.yaml", assets, tmp_path / "crashed", ["test_lightning_cli.Crash"], batch_size=1,
                          max_epochs=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(crashed)
    assert (tmp_path / "crashed" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "crashed" / "metrics.json").read_text().count('"finetuned"')

    def no_pruning(*args, **kwargs):
        raise AssertionError("resume must rebuild the pruned widths from the checkpoint, not prune again")

    monkeypatch.setattr(slimflow.api, "prune", no_pruning)
    resumed = tiny_config("demo.yaml", assets, tmp_path / "crashed", batch_size=1, max_epochs=2)
    fit(resumed, "--ckpt_path", "last")

    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())["summary"]
    again = json.loads((tmp_path / "crashed" / "metrics.json").read_text())["summary"]
    assert straight["finetuned"]["ppl"] != pytest.approx(straight["pruned"]["ppl"], rel=1e-4)  # it did train
    for name in ("dense", "pruned", "finetuned"):
        assert again[name]["parameters"] == straight[name]["parameters"]
        assert again[name]["ppl"] == pytest.approx(straight[name]["ppl"], rel=1e-6)
    a = load_pruned(tmp_path / "straight" / "export" / "model").state_dict()
    b = load_pruned(tmp_path / "crashed" / "export" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_demo_killed_mid_epoch_resumes_without_pruning_and_prints_the_summary(assets, tmp_path, monkeypatch,  # noqa: F811
                                                                             capsys):
    import slimflow.api

    run = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(tiny_config("demo.yaml", assets, run, ["test_lightning_cli.MidEpochCrash"], batch_size=1))
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 5  # the demo's mid-epoch checkpoint
    assert saved["slimflow"]["lora"] is not None
    capsys.readouterr()

    def no_pruning(*args, **kwargs):
        raise AssertionError("resume must rebuild the pruned widths from the checkpoint, not prune again")

    monkeypatch.setattr(slimflow.api, "prune", no_pruning)
    fit(tiny_config("demo.yaml", assets, run, batch_size=1), "--ckpt_path", "last")
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 10

    summary = json.loads((run / "metrics.json").read_text())["summary"]
    out = capsys.readouterr().out
    assert "slimflow: finetuning LoRA (r 4" in out and "from step 5" in out
    printed = out[out.index("slimflow: fit finished"):]
    for name in ("dense", "pruned", "finetuned"):
        assert f"{name} {summary[name]['ppl']:.2f}" in printed and f"{name} {summary[name]['parameters']:,}" in printed
    for path in ("metrics.json", "pruning_report.md", "export/model", "export/adapter", "export/base", "last.ckpt"):
        assert str(run / path) in printed or path in printed.replace(str(run) + "/", ""), path
    assert "removed (target 20.00%)" in printed


def test_iterative_recipe_per_stage_parameter_counts(assets, tmp_path):  # noqa: F811
    from slimflow.checkpoint import load_pruned
    from slimflow.surgery import count_parameters

    run = tmp_path / "iterative"
    fit(tiny_config("iterative_demo.yaml", assets, run))
    pruning = json.loads((run / "pruning.json").read_text())
    dense = pruning["dense_params"]
    counts = [r["params_after"] for r in pruning["reports"]]
    assert len(counts) == 2
    for target, count in zip((0.2, 0.35), counts):
        assert abs(1 - count / dense - target) < 0.02, (target, count, dense)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [sorted(k for k in s if k != "stage") for s in metrics["stages"]] == [["finetuned", "pruned"]] * 2
    assert metrics["summary"]["pruned"]["parameters"] == counts[1]
    assert count_parameters(load_pruned(run / "export" / "model")) == counts[1]
    assert count_parameters(load_pruned(run / "export" / "base")) == counts[1]
    assert (run / "config.yaml").is_file() and (run / "pruning_widths.png").is_file()
    assert any((run / "logs").rglob("metrics.csv")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert "35.00%" in (run / "pruning_report.md").read_text()
    # `slimflow report` reads the fit run directory: the realised fraction of the last stage, its widths
    assert pruning["params_before"] == dense and pruning["params_after"] == counts[1]
    assert slimflow_main(["report", str(run), "--output", str(tmp_path / "report")]) == 0
    row = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
               if line.startswith("| iterative |"))
    assert f"| {100 * (1 - counts[1] / dense):.1f}% |" in row
    assert (tmp_path / "report" / "layer_widths.png").is_file()


def test_validate_rebuilds_pruned_model_from_checkpoint(assets, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    config = tiny_config("demo.yaml", assets, run)
    fit(config)
    assert slimflow_main(["validate", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert (run / "config_validate.yaml").is_file()


def test_config_errors_before_any_work(assets, tmp_path, capsys):  # noqa: F811
    config = yaml.safe_load(tiny_config("demo.yaml", assets, tmp_path / "run").read_text())
    config["data"]["init_args"]["path"] = str(tmp_path / "missing.json")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(config))
    assert slimflow_main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.json" in capsys.readouterr().err

    config["data"]["init_args"]["path"] = assets["alpaca"]
    config["trainer"]["callbacks"][1]["class_path"] = "slimflow.lightning.NoSuchPruning"
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(config))
    assert slimflow_main(["fit", "--config", str(tmp_path / "unknown.yaml")]) == 2
    assert "NoSuchPruning" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pruning.json").exists()
