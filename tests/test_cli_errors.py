"""Bad inputs to every subcommand: exit status 2, one `error: ...` line naming the fix, no traceback (unless
--debug), and nothing left on disk. In-process (`slimflow.cli.main`) except for two subprocess rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported here so its log handler binds pytest's stream, not a test's capsys
import pytest
import torch
import yaml

from slimflow.cli import main
from tests.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PRUNE = ["prune", "--model", "dense", "--calibration", "calib.txt", "--output", "out", "--num-samples", "8",
         "--seqlen", "32", "--progress", "false"]
EVAL = ["eval", "--model", "dense", "--ppl", "calib.txt:32", "--max-windows", "2", "--progress", "false"]
COMPARE = ["compare", "--model", "dense", "--calibration", "calib.txt", "--output", "cmp", "--methods", "[magnitude]",
           "--ratios", "[0.2]", "--num-samples", "4", "--seqlen", "32", "--perplexity", "[calib.txt:32]"]
FIT = ["fit", "--config", "fit.yaml"]
EXPORT = ["export", "--model", "dense", "--output", "dense.gguf"]


def _words(n: int, seed: int = 0) -> str:
    ids = torch.randint(4, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return " ".join(f"w{i}" for i in ids)


def _fit_config(**pruning) -> dict:
    return {
        "trainer": {"default_root_dir": "run", "accelerator": "cpu", "max_epochs": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [
                        {"class_path": "slimflow.lightning.Calibration",
                         "init_args": {"source": "calib.txt", "num_samples": 4, "seqlen": 32}},
                        {"class_path": "slimflow.lightning.StructuredPruning",
                         "init_args": {"ratio": 0.2, "progress": False, **pruning}}]},
        "model": {"class_path": "slimflow.lightning.CausalLMModule", "init_args": {"pretrained": "dense"}},
        "data": {"class_path": "slimflow.lightning.InstructionData",
                 "init_args": {"path": "alpaca.json", "val_size": 2, "batch_size": 2}},
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny models (llama, bf16, gpt2, truncated weights), texts, a fit config and a foreign directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("cli_errors")
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 64  # the calibration text is longer: the "Token indices ..." warning would fire
    tiny_model("llama_gqa").save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    tiny_model("llama_gqa").save_pretrained(root / "truncated")
    tokenizer.save_pretrained(root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "noconfig").mkdir()
    (root / "noconfig" / "notes.txt").write_text("not a model")
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.tex").write_text("precious")
    (root / "calib.txt").write_text(_words(6000))
    (root / "short.txt").write_text(_words(40))
    (root / "empty.txt").write_text("  \n")
    (root / "alpaca.json").write_text(json.dumps(
        [{"instruction": _words(5, i), "input": "", "output": _words(6, 100 + i)} for i in range(8)]))
    (root / "fit.yaml").write_text(yaml.safe_dump(_fit_config()))
    (root / "fit_ratio.yaml").write_text(yaml.safe_dump(_fit_config(ratio=1.5)))
    (root / "fit_kwargs.yaml").write_text(yaml.safe_dump(_fit_config(method_kwargs={"nope": 1})))
    (root / "fit_option_value.yaml").write_text(yaml.safe_dump(_fit_config(
        method={"class_path": "llm_surgeon", "init_args": {"shots": 0}})))
    (root / "fit_option_unknown.yaml").write_text(yaml.safe_dump(_fit_config(
        method={"class_path": "slimflow.method_options.slimgpt", "init_args": {"dmap": 0.1}})))
    (root / "fit_impossible.yaml").write_text(yaml.safe_dump(_fit_config(ratio=0.97)))
    (root / "notarun").mkdir()
    return root


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# (id, argv, key phrase of the message); paths are relative to the work directory
ROWS = [
    # prune: values
    ("ratio-range", PRUNE + ["--ratio", "1.5"], "--ratio must be in (0, 1)"),
    ("ratio-impossible", PRUNE + ["--ratio", "0.97"], "ratio"),
    ("ratio-not-a-number", PRUNE + ["--ratio", "abc"], "ratio"),
    ("seqlen-too-long", PRUNE + ["--seqlen", "4096"], "exceeds the model's 256 positions"),
    ("num-samples-zero", PRUNE + ["--num-samples", "0"], "--num-samples ≥ 1"),
    ("sampling-unknown", PRUNE + ["--sampling", "middle"], "--sampling must be 'random' or 'tail'"),
    ("schedule-unknown", PRUNE + ["--schedule", "zigzag"], "unknown schedule 'zigzag'"),
    ("schedule-refused", PRUNE + ["--method", "flap", "--schedule", "linear"], "allocates per-layer widths itself"),
    ("method-unknown", PRUNE + ["--method", "nope"], "unknown pruning method 'nope'; available:"),
    ("method-kwargs-key", PRUNE + ["--method-kwargs", '{"exact_score": true}'],
     "has no option 'exact_score'; its options (with defaults) are: damp="),
    ("method-kwargs-value", PRUNE + ["--method", "llm-surgeon", "--method-kwargs", '{"shots": 0}'], "shots must be"),
    ("method-option-unknown", PRUNE + ["--method.exact_score", "true"],
     "method 'slimgpt' has no option 'exact_score'; its options (with defaults) are: damp=0.01, exact_head_score="),
    ("method-option-type", PRUNE + ["--method", "llm-surgeon", "--method.shots", "many"],
     "method 'llm-surgeon': option shots must be int, got 'many'; its options (with defaults) are: shots=5"),
    ("method-option-value", PRUNE + ["--method=taylor", "--method.grad_batch_size=0"],
     "method 'taylor': grad_batch_size must be ≥ 1, got 0"),
    ("save-dtype-int8", PRUNE + ["--save-dtype", "int8"], "unknown dtype 'int8'"),
    ("dtype-unknown", PRUNE + ["--dtype", "float8"], "unknown dtype 'float8'"),
    ("device-missing-cuda", PRUNE + ["--device", "cuda:7"], "cuda:7"),
    ("device-unknown", PRUNE + ["--device", "tpu"], "device 'tpu'"),
    ("option-typo", PRUNE + ["--ratoi", "0.2"], "ratoi"),
    ("option-abbreviated", PRUNE + ["--num-samp", "8"], "num_samp"),
    # prune: paths and models
    ("model-missing-relative", PRUNE + ["--model", "no/such/model"], "model directory not found: no/such/model"),
    ("model-missing-dotted", PRUNE + ["--model", "./missing"], "model directory not found"),
    ("model-no-config", PRUNE + ["--model", "noconfig"], "has no config.json"),
    ("model-unsupported", PRUNE + ["--model", "gpt2"], "cannot prune model_type='gpt2'"),
    ("model-truncated", PRUNE + ["--model", "truncated"], "model.safetensors is not a complete safetensors file"),
    ("calibration-missing", PRUNE + ["--calibration", "missing.txt"], "calibration text 'missing.txt' does not exist"),
    ("calibration-empty", PRUNE + ["--calibration", "empty.txt"], "contains no text"),
    ("calibration-repeats", PRUNE + ["--calibration", "short.txt", "--num-samples", "64"], "reused"),
    ("calibration-tail-short", PRUNE + ["--sampling", "tail", "--num-samples", "400"], "--num-samples"),
    ("generated-negative", PRUNE + ["--generated-samples", "-3"], "--generated-samples must be ≥ 0, got -3"),
    ("generated-streaming", PRUNE + ["--generated-samples", "4", "--streaming", "true"],
     "pass --generated-samples 0 or --streaming false"),
    ("adaptive-streaming", PRUNE + ["--schedule", "adaptive", "--streaming", "true"],
     "pass --schedule log_increase or --streaming false"),
    ("output-exists", PRUNE + ["--output", "foreign"], "already exists: choose another --output or pass --overwrite"),
    ("overwrite-foreign", PRUNE + ["--output", "foreign", "--overwrite"], "--overwrite refuses to replace"),
    # fit (LightningCLI)
    ("fit-abbreviated-key", FIT + ["--trainer.max_epoch", "2"], "max_epoch"),
    ("fit-model-missing", FIT + ["--model.init_args.pretrained", "no/such/model"], "no/such/model"),
    ("fit-accelerator-missing", FIT + ["--trainer.accelerator", "mps"], "MPSAccelerator` can not run"),
    ("fit-checkpoint-missing", FIT + ["--ckpt_path", "nothere.ckpt"], "checkpoint 'nothere.ckpt' not found"),
    ("fit-ratio-range", ["fit", "--config", "fit_ratio.yaml"], "ratios must increase within (0, 1)"),
    ("fit-method-kwargs", ["fit", "--config", "fit_kwargs.yaml"], "has no option 'nope'"),
    ("fit-method-option-value", ["fit", "--config", "fit_option_value.yaml"], "method 'llm-surgeon': shots must be ≥ 1"),
    ("fit-method-option-unknown", ["fit", "--config", "fit_option_unknown.yaml"],
     "method 'slimgpt' has no option 'dmap'; its options (with defaults) are: damp=0.01"),
    ("fit-ratio-impossible", ["fit", "--config", "fit_impossible.yaml"], "ratio"),
    # eval
    ("eval-no-model", ["eval", "--ppl", "calib.txt:32"], "give the model to evaluate"),
    ("eval-model-missing", EVAL + ["--model", "./missing"], "model directory not found"),
    ("eval-ppl-spec", EVAL + ["--ppl", "calib.txt"], "NAME:WINDOW"),
    ("eval-ppl-missing", EVAL + ["--ppl", "missing.txt:32"], "perplexity text 'missing.txt' does not exist"),
    ("eval-task-source", EVAL + ["--tasks", "piqa", "--task-source", "nowhere"], "task_source must be one of"),
    ("eval-batch-size", EVAL + ["--batch-size", "0"], "--batch-size must be ≥ 1"),
    ("eval-device", EVAL + ["--device", "cuda:7"], "cuda:7"),
    ("eval-truncated", EVAL + ["--model", "truncated"], "model.safetensors is not a complete safetensors file"),
    # compare
    ("compare-method-unknown", COMPARE + ["--methods", "[magnitude, nope]"], "unknown pruning method 'nope'"),
    ("compare-method-option", COMPARE + ["--method-options", '{"magnitude": {"bogus": 1}}'], "has no option 'bogus'"),
    ("compare-ratio-range", COMPARE + ["--ratios", "[1.2]"], "--ratios must be fractions in (0, 1)"),
    ("compare-ppl-missing", COMPARE + ["--perplexity", "[missing.txt:32]"], "'missing.txt' does not exist"),
    ("compare-output-exists", COMPARE + ["--output", "foreign"], "already exists"),
    ("compare-generated-negative", COMPARE + ["--generated-samples", "-1"], "--generated-samples must be ≥ 0"),
    ("compare-model-unsupported", COMPARE + ["--model", "gpt2"], "cannot prune model_type='gpt2'"),
    # export
    ("export-model-missing", EXPORT + ["--model", "./missing"], "no model directory at ./missing"),
    ("export-format", EXPORT + ["--format", "onnx"], "onnx"),
    ("export-dtype", EXPORT + ["--dtype", "q3_k"], "q3_k"),
    ("export-output-exists", EXPORT + ["--output", "calib.txt"], "calib.txt already exists"),
    ("export-truncated", EXPORT + ["--model", "truncated"], "model.safetensors"),
    ("export-unsupported", EXPORT + ["--model", "gpt2"], "gpt2"),
    # report and the entry point
    ("report-no-metrics", ["report", "notarun", "--output", "rep"], "metrics.json not found"),
    ("report-missing-dir", ["report", "nosuchrun", "--output", "rep"], "metrics.json not found"),
    ("unknown-subcommand", ["shrink"], "unknown subcommand 'shrink'"),
]


@pytest.mark.parametrize("argv,phrase", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(workdir, monkeypatch, capsys, argv, phrase):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("SLIMFLOW_DEBUG", raising=False)
    before = snapshot(workdir)
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert phrase in err, err
    assert "Traceback" not in err
    assert snapshot(workdir) == before


@pytest.mark.parametrize("row", [r for r in ROWS if r[0].startswith(("method-", "fit-method-"))], ids=lambda r: r[0])
def test_method_option_errors_are_one_line(workdir, monkeypatch, capsys, row):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("SLIMFLOW_DEBUG", raising=False)
    assert main(list(row[1])) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and row[2] in lines[0], lines


def test_debug_shows_the_traceback(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(PRUNE + ["--ratio", "1.5", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: --ratio must be in (0, 1)" in err
    monkeypatch.setenv("SLIMFLOW_DEBUG", "1")
    assert main(EVAL + ["--model", "./missing"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(workdir, monkeypatch):
    import slimflow.api

    def broken(*args, **kwargs):
        raise RuntimeError("a defect")

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(slimflow.api, "prune", broken)
    with pytest.raises(RuntimeError, match="a defect"):
        main(PRUNE)
    assert not (workdir / "out").exists()


def test_missing_relative_model_fails_fast_without_the_hub(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    for model in ("no/such/model", "./missing", "noconfig/model"):
        started = time.perf_counter()
        assert main(EVAL + ["--model", model]) == 2
        assert time.perf_counter() - started < 1.0
        assert "model directory not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv,phrase", [
    (PRUNE + ["--model", "no/such/model"], "model directory not found"),
    (["report", "nosuchrun"], "metrics.json not found"),
])
def test_bad_input_in_a_subprocess(workdir, argv, phrase):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SLIMFLOW_DEBUG", None)
    before = snapshot(workdir)
    done = subprocess.run([sys.executable, "-m", "slimflow.cli", *argv], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert phrase in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert snapshot(workdir) == before
