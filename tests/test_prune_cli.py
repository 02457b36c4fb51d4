"""`slimflow prune` on a tiny saved model: a reloadable result, and clear errors with nothing half-written."""

import json

import pytest
import torch

from slimflow.cli import main
from slimflow.data.calibration import CalibrationError
from slimflow.models import ModelLoadError
from tests.tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cli")
    model = tiny_model("llama_gqa")
    model.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    words = torch.randint(3, 128, (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    (root / "calib.txt").write_text(" ".join(f"w{i}" for i in words))
    (root / "empty.txt").write_text("   \n")
    return root


def run(workdir, *extra, output="out"):
    args = ["prune", "--model", str(workdir / "dense"), "--calibration", str(workdir / "calib.txt"),
            "--output", str(workdir / output), "--num-samples", "8", "--seqlen", "32", "--progress", "false", *extra]
    return main(args)


def test_prune_writes_a_reloadable_checkpoint(workdir):
    run(workdir, "--ratio", "0.25", output="ok")
    out = workdir / "ok"
    info = json.loads((out / "pruning.json").read_text())
    assert info["params_after"] < info["params_before"]
    assert abs(info["realised_fraction"] - 0.25) < 0.06
    assert (out / "pruning_report.md").is_file() and (out / "widths.png").stat().st_size > 1000
    assert (out / "slimflow_prune.yaml").is_file()
    from slimflow import load_pruned

    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(workdir, output="ok")
    run(workdir, "--ratio", "0.3", "--overwrite", "true", output="ok")
    assert json.loads((out / "pruning.json").read_text())["settings"]["ratio"] == 0.3


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (["--ratio", "1.5"], ValueError, r"\(0, 1\)"),
        (["--ratio", "0"], ValueError, r"\(0, 1\)"),
        (["--ratio", "0.85"], ValueError, "Lower the ratio|every head"),
        (["--seqlen", "4096"], ValueError, "positions"),
        (["--method", "nope"], ValueError, "available"),
        (["--ratio", "0.75", "--calibration", "missing.txt"], ValueError, "every head|Lower the ratio"),  # planned before data
    ],
)
def test_bad_arguments_leave_no_output(workdir, extra, error, match):
    with pytest.raises(error, match=match):
        run(workdir, *extra, output="bad")
    assert not (workdir / "bad").exists()


def test_bad_data_and_model_paths(workdir):
    with pytest.raises(CalibrationError, match="no text"):
        main(["prune", "--model", str(workdir / "dense"), "--calibration", str(workdir / "empty.txt"),
              "--output", str(workdir / "bad2"), "--seqlen", "32"])
    with pytest.raises(CalibrationError, match="--num-samples"):
        run(workdir, "--sampling", "tail", "--num-samples", "400", output="bad2")
    with pytest.raises(ModelLoadError, match="not found"):
        main(["prune", "--model", str(workdir / "missing"), "--calibration", str(workdir / "calib.txt"),
              "--output", str(workdir / "bad2")])
    assert not (workdir / "bad2").exists()
