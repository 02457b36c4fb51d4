"""The example projects in examples/ run as they are documented (as subprocesses, on the tiny model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_lightning import assets  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def test_own_lightning_project_example_runs_and_restores(assets, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "examples/own_lightning_project.py", "--root", str(root), "--model", assets["model"],
         "--train_text", assets["text"], "--held_out", assets["text"], "--skip_tokens", "0", "--steps", "3",
         "--seqlen", "32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = re.search(r"val loss: trained ([\d.]+) \| load_from_checkpoint ([\d.]+) \| best checkpoint ([\d.]+); "
                     r"resumed to step (\d+)", done.stdout)
    assert line, done.stdout[-3000:]
    trained, loaded, best, step = line.groups()
    assert trained == loaded == best and int(step) == 6
    assert "slimflow: pruning 20%" in done.stdout
    summary = json.loads((root / "metrics.json").read_text())["summary"]
    assert summary["pruned"]["parameters"] < 0.82 * summary["dense"]["parameters"]
    assert (root / "export" / "model" / "model.safetensors").is_file()
    assert any((root / "logs").rglob("metrics.csv"))


def test_docs_say_where_pickles_are_and_how_they_load():
    text = (REPO / "docs" / "checkpoints.md").read_text()
    assert "No pickles are written anywhere" not in text
    assert "<run>/checkpoints/*.ckpt" in text and "weights_only=True" in text
