"""Evaluation suite: perplexity protocol, bundled lm-eval tasks, reports, generation, `slimflow eval`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import require_shared
from slimflow.evaluation import local_data, perplexity, zeroshot
from slimflow.evaluation.paths import REPO_ROOT, resolve_data_dir

TOKENIZER_DIR = REPO_ROOT.parent / "shared" / "models" / "ref-llama-27m"
DATA_DIR = resolve_data_dir()
# Outside CI these skip when ../shared is absent; in CI (CI=true) they run, and fail if it is missing.
needs_tokenizer = pytest.mark.skipif(not TOKENIZER_DIR.is_dir() and not os.environ.get("CI"),
                                     reason="needs ../shared/models/ref-llama-27m beside the clone")
needs_data = pytest.mark.skipif(DATA_DIR is None and not os.environ.get("CI"),
                                reason="needs ../shared/data beside the clone")
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
) * 6


@pytest.fixture(scope="module")
def tokenizer():
    require_shared(TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(TEXT)
    return path


# ------------------------------------------------------------------------------------------------ perplexity
def direct_perplexity(model, ids: torch.Tensor, window: int) -> float:
    n = len(ids) // window
    nll, count = 0.0, 0
    for w in ids[: n * window].view(n, window):
        with torch.no_grad():
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
        nll -= logp[:-1].gather(1, w[1:, None]).sum().item()
        count += window - 1
    return math.exp(nll / count)


@needs_tokenizer
def test_perplexity_equals_direct_computation(tiny_model, tokenizer, text_file):
    result = perplexity.evaluate_perplexity(tiny_model, tokenizer, f"{text_file}:32", batch_size=4, progress=False)
    ids = perplexity.tokenize_texts(tokenizer, [TEXT])
    assert ids[0].item() == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
    assert result.num_windows == len(ids) // 32 and result.num_tokens == result.num_windows * 31
    assert result.value == pytest.approx(direct_perplexity(tiny_model, ids, 32), rel=1e-5)
    assert result.dataset == "story.txt" and result.window == 32


@needs_tokenizer
def test_perplexity_does_not_depend_on_batch_size(tiny_model, tokenizer, text_file):
    values = {bs: perplexity.evaluate_perplexity(tiny_model, tokenizer, f"{text_file}:16", batch_size=bs,
                                                 progress=False).value for bs in (1, 3, 8)}
    assert values[1] == pytest.approx(values[3], rel=1e-6) and values[1] == pytest.approx(values[8], rel=1e-6)


@needs_tokenizer
def test_max_windows_and_max_tokens(tiny_model, tokenizer, text_file):
    limited = perplexity.evaluate_perplexity(tiny_model, tokenizer, f"{text_file}:16", max_windows=3, progress=False)
    assert limited.num_windows == 3 and limited.num_tokens == 45
    cut = perplexity.evaluate_perplexity(tiny_model, tokenizer, f"{text_file}:16:50", progress=False)
    assert cut.num_windows == 3 and cut.max_tokens == 50


def test_spec_parsing_and_bad_input(tiny_model, tmp_path):
    assert perplexity.parse_spec("wikitext2:128") == ("wikitext2", 128, None)
    assert perplexity.parse_spec("a/b.txt.gz:128:400000") == ("a/b.txt.gz", 128, 400000)
    with pytest.raises(ValueError, match="NAME:WINDOW"):
        perplexity.parse_spec("wikitext2")
    with pytest.raises(ValueError, match="context of 256 tokens"):
        perplexity.evaluate_perplexity(tiny_model, None, "wikitext2:2048")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        perplexity.load_texts(str(tmp_path / "missing.txt"))


def test_wikitext2_rows_and_json_files(tmp_path):
    assert perplexity.wikitext2_rows_from_raw(" \n = Title = \n \n text \n") == ["", " = Title = \n", "", " text \n"]
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.json").write_text('["x", "y"]')
    assert perplexity.load_texts(str(tmp_path / "a.jsonl"))[0] == ["one", "two"]
    assert perplexity.load_texts(str(tmp_path / "b.json"))[0] == ["x", "y"]


# ------------------------------------------------------------------------------------------- bundled lm-eval
LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
STANDARD_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}


def hellaswag_hub_records(records: list[dict]) -> list[dict]:
    """Local HellaSwag records in the Hub schema; `ctx_b` is empty because the local file has only `ctx`."""
    out = []
    for r in records:
        label, ctx = r["query"].split(": ", 1)
        out.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": r["choices"], "label": r["label"]})
    return out


def standard_task(task: str, records: list[dict]):
    """The installed lm-eval's own task definition, fed with `records` instead of its Hub data set."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(LM_EVAL_TASKS / STANDARD_YAML[task])
    for key in ("dataset_path", "dataset_name", "tag"):
        config.pop(key, None)
    splits = {config[k] for k in ("training_split", "validation_split", "test_split") if config.get(k)}
    dataset = datasets.Dataset.from_list(records)
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({split: dataset for split in splits})
    return ConfigurableTask(config=config)


def requests_of(task, doc) -> tuple:
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
    return task.doc_to_text(doc), task.doc_to_target(doc), choices


@pytest.fixture(scope="module")
def bundled_tasks():
    from lm_eval.tasks import TaskManager

    require_shared(REPO_ROOT.parent / "shared" / "data")
    manager = TaskManager(include_path=str(zeroshot.TASKS_DIR), include_defaults=False)
    return manager.load([f"slimflow_{t}" for t in local_data.LOCAL_TASKS])["tasks"]


@needs_data
@pytest.mark.parametrize("task", list(local_data.LOCAL_TASKS))
def test_bundled_task_matches_standard_definition(task, bundled_tasks):
    ours = bundled_tasks[f"slimflow_{task}"]
    docs = list(ours.eval_docs)[:5]
    records = local_data.CONVERTERS[task](local_data.local_file(task))[:5]
    hub_records = hellaswag_hub_records(records) if task == "hellaswag" else records
    standard = standard_task(task, hub_records)
    for ours_doc, standard_doc in zip(docs, standard.eval_docs):
        assert requests_of(ours, ours_doc) == requests_of(standard, standard_doc)
    assert ours.config.metric_list == standard.config.metric_list
    assert ours.config.target_delimiter == standard.config.target_delimiter == " "


@needs_data
def test_bundled_prompts_against_raw_local_files(bundled_tasks):
    def first(task):
        return bundled_tasks[f"slimflow_{task}"], next(iter(bundled_tasks[f"slimflow_{task}"].eval_docs))

    raw = {t: local_data.read_jsonl(local_data.local_file(t))[0] for t in local_data.LOCAL_TASKS}
    task, doc = first("arc_easy")
    assert task.doc_to_text(doc) == raw["arc_easy"]["query"] + "\nAnswer:"
    assert task.doc_to_choice(doc) == raw["arc_easy"]["choices"] and task.doc_to_target(doc) == raw["arc_easy"]["gold"]
    task, doc = first("boolq")
    assert task.doc_to_text(doc) == raw["boolq"]["query"].removeprefix("Passage: ") + "\nAnswer:"
    task, doc = first("winogrande")
    assert task.doc_to_choice(doc) == raw["winogrande"]["context_options"]
    assert task.doc_to_target(doc) == raw["winogrande"]["continuation"]
    assert task.doc_to_text(doc) == raw["winogrande"]["gold"]
    task, doc = first("lambada_openai")
    assert task.doc_to_text(doc) == raw["lambada_openai"]["context"]
    assert task.doc_to_target(doc) == " " + raw["lambada_openai"]["continuation"]
    task, doc = first("hellaswag")
    assert task.doc_to_text(doc) == raw["hellaswag"]["query"] and task.doc_to_target(doc) == raw["hellaswag"]["label"]
    task, doc = first("openbookqa")
    assert task.doc_to_text(doc) == raw["openbookqa"]["query"]


def test_unknown_task_lists_close_matches(monkeypatch):
    # a short stand-in for lm-eval's full index (building the real one takes ~10 s)
    monkeypatch.setattr(zeroshot, "all_lm_eval_task_names", lambda: ("piqa", "hellaswag", "mmlu", "arc_easy"))
    assert zeroshot.resolve_task("mmlu").source == "hub"
    with pytest.raises(ValueError, match="piqa"):
        zeroshot.resolve_task("piqaa")
    with pytest.raises(ValueError, match="Did you mean"):
        zeroshot.resolve_task("slimflow_hellaswagg")


def test_missing_local_data_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        zeroshot.resolve_task("piqa", task_source="local", data_dir=tmp_path)
    assert zeroshot.resolve_task("piqa", task_source="auto", data_dir=tmp_path).source == "hub"


def test_average_uses_the_methods_rule():
    results = {t: {"value": 0.5} for t in zeroshot.SEVEN}
    results["hellaswag"]["value"] = 0.85
    average = zeroshot.average_of_seven(results)
    assert average["complete"] and average["metrics"]["hellaswag"] == "acc_norm"
    assert average["value"] == pytest.approx((6 * 0.5 + 0.85) / 7)


# ---------------------------------------------------------------------------------- suite, CLI, report, samples
@needs_tokenizer
@needs_data
def test_evaluate_model_is_json_serialisable(tiny_model, tokenizer, text_file):
    from slimflow.evaluation.suite import evaluate_model

    metrics = evaluate_model(tiny_model, tokenizer, ppl=[f"{text_file}:32"], tasks=["arc_easy"], limit=3,
                             batch_size=4, progress=False)
    json.dumps(metrics)
    task = metrics["tasks"]["arc_easy"]
    assert task["source"] == "local" and task["num_samples"] == 3 and {"acc", "acc_norm"} <= set(task["metrics"])
    assert metrics["average"]["tasks"] == ["arc_easy"] and not metrics["average"]["complete"]
    assert metrics["versions"]["lm_eval"] and metrics["perplexity"][f"{text_file}:32"]["window"] == 32


@needs_tokenizer
def test_cli_eval_writes_metrics(tiny_model, tokenizer, text_file, tmp_path):
    from slimflow.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run" / "metrics.json"
    main(["eval", "--model", str(model_dir), "--ppl", f"{text_file}:16,{text_file}:32", "--max-windows", "2",
          "--output", str(out), "--samples", "1", "--progress", "false"])
    metrics = json.loads(out.read_text())
    assert set(metrics["perplexity"]) == {f"{text_file}:16", f"{text_file}:32"}
    assert metrics["perplexity"][f"{text_file}:16"]["num_windows"] == 2
    assert json.loads((out.parent / "samples.json").read_text())["samples"][0]["new_tokens"] > 0


def fake_run(folder: Path, ppl: float, params: int, heads: int) -> Path:
    folder.mkdir(parents=True)
    metrics = {
        "model": {"parameters": params},
        "perplexity": {"wikitext2:128": {"value": ppl}},
        "tasks": {"piqa": {"metric": "acc", "value": 0.6}, "hellaswag": {"metric": "acc_norm", "value": 0.3}},
        "average": {"value": 0.45, "complete": False},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    layers = [{"num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": 100 + i}
              for i in range(3)]
    (folder / "pruning.json").write_text(json.dumps({"params_before": 1000, "params_after": params, "layers": layers}))
    return folder


def test_report_writes_table_and_plots(tmp_path):
    from slimflow.evaluation.commands import report

    runs = [fake_run(tmp_path / "dense", 10.0, 1000, 8), fake_run(tmp_path / "pruned", 15.0, 800, 6)]
    written = report([str(r) for r in runs], output=str(tmp_path / "out"))
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| dense | 1,000 | 0.0% | 10.00 | 60.00 | 30.00 | 45.00* |" in table
    assert "| pruned | 800 | 20.0% | 15.00 |" in table
    assert len(written["plots"]) == 2 and all(Path(p).stat().st_size > 0 for p in written["plots"])


@needs_tokenizer
def test_generation_samples(tiny_model, tokenizer, tmp_path):
    from slimflow.evaluation.generation import generate_samples, save_samples

    samples = generate_samples(tiny_model, tokenizer, ["Hello there", "The sea"], max_new_tokens=4)
    assert [s["new_tokens"] for s in samples] == [4, 4]
    json_path, md_path = save_samples(samples, tmp_path / "samples.json")
    assert json.loads(json_path.read_text())["samples"][1]["prompt"] == "The sea" and "The sea" in md_path.read_text()


@needs_tokenizer
def test_eval_and_report_on_a_pruned_checkpoint(tokenizer, text_file, tmp_path):
    checkpoint = pytest.importorskip("slimflow.checkpoint")
    from slimflow.evaluation.commands import eval as evaluate, report
    from slimflow.surgery import LayerWidths, apply_widths

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    apply_widths(model, [LayerWidths(2, 1, 96), LayerWidths(4, 2, 64)])
    folder = checkpoint.save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)
    metrics = evaluate(model=str(folder), ppl=[f"{text_file}:16"], max_windows=2, output=str(folder), progress=False)
    assert metrics["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    report([str(folder)], output=str(tmp_path / "report"))
    assert "| pruned |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "layer_widths.png").stat().st_size > 0
