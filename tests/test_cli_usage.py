"""The documented command forms work as documented: `report` argument forms, a bare `--overwrite`, `--save-dtype
auto`, outputs complete at the atomic rename, no tokenizer length warning, fast and descriptive help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimflow.cli import main
from tests.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_usage")
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 64  # shorter than the calibration text
    tiny_model("llama_gqa").save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    tiny_model("llama_gqa", dtype=torch.bfloat16).save_pretrained(root / "bf16")
    tokenizer.save_pretrained(root / "bf16")
    words = torch.randint(4, 128, (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    (root / "calib.txt").write_text(" ".join(f"w{i}" for i in words))
    return root


def prune(workdir, output, *extra):
    return main(["prune", "--model", str(workdir / "dense"), "--calibration", str(workdir / "calib.txt"), "--output",
                 str(workdir / output), "--num-samples", "8", "--seqlen", "32", "--progress", "false", *extra])


def weights_dtype(directory: Path) -> torch.dtype:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(next(k for k in f.keys() if k.endswith("q_proj.weight"))).dtype


def test_save_dtype_auto_keeps_a_bf16_source(workdir):
    out = workdir / "bf16_pruned"
    assert main(["prune", "--model", str(workdir / "bf16"), "--calibration", str(workdir / "calib.txt"), "--output",
                 str(out), "--num-samples", "8", "--seqlen", "32", "--progress", "false"]) == 0
    assert weights_dtype(out) == torch.bfloat16
    assert json.loads((out / "pruning.json").read_text())["save_dtype"] == "bfloat16"
    assert prune(workdir, "fp32_pruned") == 0 and weights_dtype(workdir / "fp32_pruned") == torch.float32


def test_bare_overwrite_replaces_a_slimflow_output_only(workdir, capsys):
    assert prune(workdir, "again", "--ratio", "0.2") == 0
    assert prune(workdir, "again", "--ratio", "0.3", "--overwrite") == 0  # bare flag, as the message suggests
    assert json.loads((workdir / "again" / "pruning.json").read_text())["settings"]["ratio"] == 0.3
    assert prune(workdir, "again", "--ratio", "0.25", "--overwrite", "--progress", "false") == 0
    (workdir / "mine").mkdir()
    (workdir / "mine" / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert prune(workdir, "mine", "--overwrite") == 2
    assert "refuses to replace" in capsys.readouterr().err
    assert (workdir / "mine" / "notes.txt").read_text() == "keep me"


def test_everything_of_a_prune_output_is_inside_the_atomic_rename(workdir, monkeypatch):
    import slimflow.checkpoint

    seen = {}
    rename = slimflow.checkpoint.replace_directory

    def killed_after_rename(staging, path):
        seen["staged"] = sorted(p.name for p in staging.iterdir())
        rename(staging, path)
        raise KeyboardInterrupt  # the process dies right after the rename

    monkeypatch.setattr(slimflow.checkpoint, "replace_directory", killed_after_rename)
    with pytest.raises(KeyboardInterrupt):
        prune(workdir, "killed")
    assert {"widths.png", "slimflow_prune.yaml", "pruning_report.md", "pruning.json", "model.safetensors",
            "config.json"} <= set(seen["staged"])
    assert set(seen["staged"]) == {p.name for p in (workdir / "killed").iterdir()}


def test_no_token_length_warning(workdir):
    """Calibration (prune, and the Calibration callback of fit) tokenises whole texts on purpose."""
    import logging

    from slimflow.data.calibration import calibration_ids

    class Record(logging.Handler):
        messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Record()
    logging.getLogger("transformers").addHandler(handler)
    try:
        tokenizer = tiny_tokenizer()
        tokenizer.model_max_length = 64
        for sampling in ("random", "tail"):
            calibration_ids(str(workdir / "calib.txt"), tokenizer, num_samples=8, seqlen=32, sampling=sampling)
        assert prune(workdir, "quiet") == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in handler.messages if "Token indices sequence length" in m]


def test_calibration_repeats_warn_with_the_token_count(workdir):
    from slimflow.data.calibration import CalibrationRepeatWarning, calibration_ids

    with pytest.warns(CalibrationRepeatWarning, match=r"has \d+ distinct tokens but 64 × 256 = 16384"):
        calibration_ids(str(workdir / "calib.txt"), tiny_tokenizer(), num_samples=64, seqlen=256)


def fake_run(folder: Path, params_after: int, ppl: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"model": {"parameters": params_after},
                                                     "perplexity": {"x:32": {"value": ppl}}, "tasks": {}}))
    (folder / "pruning.json").write_text(json.dumps({"params_before": 1000, "params_after": params_after}))
    return folder


@pytest.mark.parametrize("form", ["one", "several", "comma", "list"])
def test_report_accepts_the_documented_forms(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    a, b = fake_run(tmp_path / "a", 800, 12.0), fake_run(tmp_path / "b", 600, 20.0)
    runs = {"one": ["a"], "several": ["a", "b"], "comma": ["a,b"], "list": ["[a, b]"]}[form]
    assert main(["report", *runs, "--output", "rep"]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| a | 800 | 20.0% | 12.00 |" in table
    assert ("| b | 600 | 40.0% | 20.00 |" in table) == (form != "one")
    assert main(["report", "--output", "rep2", *runs]) == 0  # options before the runs


def test_report_reads_a_fit_run_written_before_the_key_change(tmp_path, monkeypatch):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"model": {"parameters": 80}, "perplexity": {}, "tasks": {}}))
    (run / "pruning.json").write_text(json.dumps({"stage": 1, "dense_params": 100, "widths": [[4, 2, 64]],
                                                  "reports": [{"params_after": 80}]}))
    assert main(["report", str(run), "--output", str(tmp_path / "rep")]) == 0
    assert "| demo | 80 | 20.0% |" in (tmp_path / "rep" / "report.md").read_text()


def test_help_lists_what_each_subcommand_does(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prune", "fit", "eval", "report", "compare", "export"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split()) > 4, line


def test_function_command_help_does_not_import_torch():
    """`--help` of prune/eval/report/compare/export must not pay for torch (seconds on a loaded machine)."""
    code = ("import sys, contextlib, io\nfrom slimflow.cli import main\n"
            "for name in ('prune', 'eval', 'report', 'compare', 'export'):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert main([name, '--help']) == 0\n"
            "    assert name in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_lightning_command_help_is_kept_after_the_first_call(tmp_path, monkeypatch, capsys):
    """`fit --help` needs Lightning (seconds to import): its text is built once, then printed without it."""
    import lightning.pytorch  # noqa: F401 - its log handler binds pytest's stream, not this test's capsys

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["fit", "--help"]) == 0
    first = capsys.readouterr().out
    assert "--trainer.max_epochs" in first and first.startswith("usage: slimflow")
    code = ("import sys\nfrom slimflow.cli import main\nassert main(['fit', '--help']) == 0\n"
            "sys.stderr.write(str(sorted(m for m in ('torch', 'lightning') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == first and done.stderr.strip().endswith("[]")


def test_every_method_shows_its_options_in_help_and_print_config(workdir, capsys):
    """`prune --method NAME --print_config` prints the method's options with their defaults, `--method.help NAME`
    lists `--method.OPTION` with its help text, and `prune --help` names every method's options."""
    import yaml

    from slimflow.method_options import BUILTIN
    from slimflow.methods import available_methods

    options = {cls.method: cls for cls in BUILTIN}
    assert sorted(options) == available_methods()
    assert main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, cls in options.items():
        listed = ", ".join(f"{k}={v!r}" for k, v in cls.fields().items()) or "none"
        assert f"{name}: {listed}" in text
        assert main(["prune", "--model", "m", "--calibration", "c", "--output", "o", "--method", name,
                     "--print_config"]) == 0
        config = yaml.safe_load(capsys.readouterr().out)["method"]
        assert config == {"class_path": f"slimflow.method_options.{cls.__name__}", "init_args": cls().to_dict()}
        assert main(["prune", "--method.help", name]) == 0
        shown = " ".join(capsys.readouterr().out.split())
        for field in cls.fields():
            assert f"--method.{field} " in shown
    assert main(["prune", "--method.help", "llm-surgeon"]) == 0
    assert "--method.shots SHOTS number of shots T of the linear schedule" in " ".join(capsys.readouterr().out.split())


def test_fit_print_config_shows_the_method_options(tmp_path, monkeypatch, capsys):
    """`slimflow fit --print_config`: the pruning callback's method with every option (YAML `method: NAME`, or
    `class_path: NAME` with some `init_args`)."""
    import yaml

    import lightning.pytorch  # noqa: F401 - its log handler binds pytest's stream, not this test's capsys

    config = yaml.safe_load((REPO / "configs" / "prune_then_lora.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    pruning = next(c for c in callbacks if c["class_path"].endswith("StructuredPruning"))
    for method, expected in (("taylor", {"mode": "param_first", "grad_batch_size": 2}),
                             ({"class_path": "llm_surgeon", "init_args": {"shots": 8}},
                              {"shots": 8, "damp": 0.01, "grad_samples": None, "grad_batch_size": 2,
                               "max_layer_ratio": 0.9, "per_param": True})):
        pruning["init_args"]["method"] = method
        (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
        assert main(["fit", "--config", str(tmp_path / "fit.yaml"), "--print_config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
        shown = next(c for c in printed if c["class_path"].endswith("StructuredPruning"))["init_args"]["method"]
        assert shown["init_args"] == expected
