"""`slimflow prune` on a tiny saved model: a reloadable result, and clear errors with nothing half-written."""

import json

import pytest
import torch

from slimflow.cli import main
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
    assert run(workdir, output="ok") == 2
    run(workdir, "--ratio", "0.3", "--overwrite", "true", output="ok")
    assert json.loads((out / "pruning.json").read_text())["settings"]["ratio"] == 0.3


def test_generated_samples_from_the_command_line_prune_like_the_api(workdir):
    import slimflow
    from slimflow.data.calibration import calibration_ids
    from slimflow.models import load_tokenizer

    run(workdir, "--ratio", "0.25", "--generated-samples", "4", "--seed", "3", "--device", "cpu", output="sampled")
    out = workdir / "sampled"
    info = json.loads((out / "pruning.json").read_text())
    assert (info["settings"]["num_samples"], info["settings"]["generated_samples"]) == (8, 4)
    assert info["calibration"]["generated_samples"] == 4
    ids = calibration_ids(str(workdir / "calib.txt"), load_tokenizer(str(workdir / "dense")), 8, 32, 3, "random", 0)
    twin = tiny_model("llama_gqa")
    slimflow.prune(twin, ids, ratio=0.25, generated_samples=4, seed=3, device="cpu", progress=False)
    from slimflow import load_pruned

    model = load_pruned(out)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


def test_the_adaptive_schedule_samples_256_sequences_by_default(workdir):
    run(workdir, "--ratio", "0.25", "--schedule", "adaptive", "--device", "cpu", output="adaptive")
    info = json.loads((workdir / "adaptive" / "pruning.json").read_text())
    assert (info["settings"]["num_samples"], info["settings"]["generated_samples"]) == (8, 256)
    assert info["calibration"]["generated_samples"] == 256
    # the search scores on other windows of the calibration text: as many as the short text holds
    search = info["settings"]["allocation"]["search"]
    windows = info["calibration"]["scoring_windows"]
    assert search["score_on"] == "source" and search["split"] == [32, windows] and 16 <= windows <= 6000 // (32 - 15)  # overlaps under 16 tokens are allowed
    assert info["settings"]["allocation"]["measured_rows"] == 8 + 256  # no calibration row held out


# More bad inputs, across all subcommands, are in tests/test_cli_errors.py.
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--ratio", "1.5"], r"\(0, 1\)"),
        (["--ratio", "0.85"], "Lower the ratio|every head"),
        (["--seqlen", "4096"], "positions"),
        (["--ratio", "0.75", "--calibration", "missing.txt"], "missing.txt' does not exist"),  # before the model loads
    ],
)
def test_bad_arguments_leave_no_output(workdir, extra, match, capsys):
    assert run(workdir, *extra, output="bad") == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (workdir / "bad").exists()


def test_compare_prunes_every_method_on_the_same_data_and_writes_its_table(workdir):
    args = ["compare", "--model", str(workdir / "dense"), "--calibration", str(workdir / "calib.txt"),
            "--output", str(workdir / "cmp"), "--methods", "[magnitude, slimgpt]", "--ratios", "[0.25]",
            "--num-samples", "8", "--seqlen", "32", "--sampling", "random", "--generated-samples", "3",
            "--perplexity", f"[{workdir / 'calib.txt'}:32]", "--max-windows", "4", "--device", "cpu"]
    assert main(args) == 0
    rows = json.loads((workdir / "cmp" / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "magnitude", "slimgpt"]
    assert all(r["samples"] == 8 + 3 for r in rows[1:])  # 8 drawn + 3 sampled, the same for every method
    dense, magnitude, slimgpt = (list(r["ppl"].values())[0] for r in rows)
    assert dense < slimgpt < magnitude  # OBS compensation beats plain magnitude on its own calibration text
    assert (workdir / "cmp" / "comparison.md").read_text().count("|") > 10
    assert (workdir / "cmp" / "comparison.png").stat().st_size > 1000


def test_progress_false_shows_no_progress_bars(workdir, capsys):
    capsys.readouterr()
    run(workdir, "--ratio", "0.25", output="quiet")
    err = capsys.readouterr().err
    assert "it/s" not in err and "%|" not in err, err
