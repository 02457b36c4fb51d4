"""`slimflow fit` on 2 CPU processes over gloo (`--trainer.devices 2`) with `ddp` and `fsdp2`, against 1 process.

Each run is a real `python -m slimflow.cli fit` subprocess: Lightning's launcher starts rank 1 by running the
command line again. Pruning happens on both ranks with data-parallel statistics, so the pruned model
(`export/base`) must equal the single-process one; LoRA then trains under the strategy (2 ranks see other
batches than 1, so the finetuned weights differ) and the exported model must have the single-process shapes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_lightning import assets  # noqa: F401  (fixture)
from test_lightning_cli import fit, tiny_config

REPO = Path(__file__).resolve().parents[1]


def run_fit(config: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    """`slimflow fit --config CONFIG` as a command; its whole process group is killed if it overruns."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimflow.cli", "fit", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"slimflow fit overran {timeout}s:\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _small(config: Path) -> Path:
    import yaml

    data = yaml.safe_load(config.read_text())
    for cb in data["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(samples=1, sample_tokens=8, max_windows=4)
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("single") / "run"
    fit(_small(tiny_config("demo.yaml", assets, run)))
    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_prune_like_one_and_export_the_same_shapes(assets, single, tmp_path, strategy):  # noqa: F811
    from slimflow.checkpoint import load_pruned

    run = tmp_path / strategy
    done = run_fit(_small(tiny_config("demo.yaml", assets, run, devices=2, strategy=strategy)))
    assert done.returncode == 0, done.stdout[-4000:]
    assert "Starting with 2 processes" in done.stdout

    ours, theirs = (json.loads((r / "pruning.json").read_text()) for r in (run, single))
    assert ours["widths"] == theirs["widths"]
    assert ours["reports"][0]["settings"]["data_parallel"] == 2
    base, base_1 = (load_pruned(r / "export" / "base").state_dict() for r in (run, single))
    assert base.keys() == base_1.keys()
    for name in base:  # same decisions; weights equal up to float32 summation order
        assert torch.allclose(base[name], base_1[name], rtol=1e-4, atol=1e-5), name
    model, model_1 = (load_pruned(r / "export" / "model").state_dict() for r in (run, single))
    assert {k: v.shape for k, v in model.items()} == {k: v.shape for k, v in model_1.items()}
    assert any(not torch.equal(model[k], base[k]) for k in model)  # LoRA trained and was merged
    metrics = json.loads((run / "metrics.json").read_text())["summary"]
    assert metrics["finetuned"]["parameters"] == metrics["pruned"]["parameters"] < metrics["dense"]["parameters"]
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_iterative_recipe_on_two_processes_is_refused_with_the_reason(assets, tmp_path):  # noqa: F811
    done = run_fit(tiny_config("iterative_demo.yaml", assets, tmp_path / "it", devices=2, strategy="ddp"))
    assert done.returncode != 0
    assert "cannot run on 2 processes" in done.stdout and "--trainer.devices 1" in done.stdout
    assert not (tmp_path / "it" / "export").exists()


def test_several_processes_need_the_command_line(assets, tmp_path, capsys):  # noqa: F811
    from slimflow.cli import main

    assert main(["fit", "--config", str(tiny_config("demo.yaml", assets, tmp_path / "run", devices=2,
                                                    strategy="ddp"))]) == 2
    assert "run `slimflow fit` as a command" in capsys.readouterr().err
