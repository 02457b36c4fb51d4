"""One model loader, one tokenizer loader, one config reader, one text reader and one path rule."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from slimflow.data.text import DataSourceError, read_local_texts, read_records, read_texts
from slimflow.errors import MissingInputError, SlimflowUserError, looks_local
from slimflow.models import ModelLoadError, load_model, load_tokenizer, read_config, source_dtype

TEXTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub access fails the test: local-looking sources must never be looked up on the hub."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a local-looking source went to the hub")

    for name in ("hf_hub_download", "snapshot_download", "model_info", "dataset_info"):
        monkeypatch.setattr(huggingface_hub, name, refuse, raising=False)


def _write_all_formats(root):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (root / "a.jsonl").write_text(lines)
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (root / "array.json").write_text(json.dumps(records))
    (root / "lines.json").write_text(lines)
    (root / "strings.json").write_text(json.dumps(TEXTS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), root / "a.parquet")
    return ["a.jsonl", "a.jsonl.gz", "array.json", "lines.json", "strings.json", "a.parquet"]


def test_one_text_reader_for_every_format(tmp_path, no_hub):
    for name in _write_all_formats(tmp_path):
        assert read_texts(str(tmp_path / name)) == TEXTS, name
    (tmp_path / "plain.txt").write_text("one\n\ntwo")
    with gzip.open(tmp_path / "plain.txt.gz", "wt", encoding="utf-8") as f:
        f.write("one\n\ntwo")
    assert read_texts(str(tmp_path / "plain.txt")) == read_texts(str(tmp_path / "plain.txt.gz")) == ["one\n\ntwo"]
    (tmp_path / "other.jsonl").write_text('{"content": "c1"}\n{"body": "b", "content": "c2"}\n')
    assert read_local_texts(tmp_path / "other.jsonl") == ["c1", "c2"]
    with pytest.raises(DataSourceError, match="cannot find a text field"):
        read_local_texts(tmp_path / "other.jsonl", field="text")
    with pytest.raises(MissingInputError, match="not found"):
        read_texts(str(tmp_path / "missing.parquet"))


def test_calibration_perplexity_and_instruction_data_share_the_reader(tmp_path, no_hub):
    """Parquet exists only in `slimflow.data.text`: every consumer reading it proves they all go through it."""
    from slimflow.data.calibration import calibration_ids
    from slimflow.evaluation.perplexity import load_texts
    from slimflow.lightning.data import InstructionData

    _write_all_formats(tmp_path)
    path = str(tmp_path / "a.parquet")
    assert load_texts(path)[0] == TEXTS
    ids = calibration_ids(path, tiny_tokenizer(), num_samples=2, seqlen=3, seed=0)
    assert ids.shape == (2, 3) and set(ids.flatten().tolist()) <= set(range(5, 14))
    import pyarrow as pa
    import pyarrow.parquet as pq

    alpaca = [{"instruction": f"w{4 + i}", "input": "", "output": f"w{20 + i}"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "alpaca.parquet")
    assert read_records(str(tmp_path / "alpaca.parquet")) == alpaca
    data = InstructionData(path=str(tmp_path / "alpaca.parquet"), tokenizer=tiny_tokenizer(), val_size=2,
                           distill_text=path, distill_seqlen=2)
    data.setup("fit")
    assert len(data.train_set) == 4 and all(len(e["distill_input_ids"]) == 2 for e in data.train_set)


@pytest.mark.parametrize("source, local", [
    ("./x", True), ("/abs/model", True), ("~/m", True), ("a/b/c", True), ("text.txt.gz", True),
    ("train.parquet", True), ("org/name", False), ("c4", False), ("yahma/alpaca-cleaned", False),
])
def test_path_rule(source, local):
    assert looks_local(source) is local


def test_path_rule_sees_existing_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("runs/model")
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/model")  # `dir/name` where `dir` exists is a path, not a hub id


def test_one_model_loader_errors_are_one_line(tmp_path, no_hub):
    with pytest.raises(ModelLoadError, match="model directory not found: ./nothere") as missing:
        load_model("./nothere", device="cpu")
    assert isinstance(missing.value, FileNotFoundError)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no model here")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path / "notes"), device="cpu")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*no_such_architecture"):
        load_model(str(tmp_path / "alien"), device="cpu")
    with pytest.raises(ModelLoadError, match="tokenizer directory not found"):
        load_tokenizer("./nothere")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        read_config(tmp_path / "notes")
    for error in (missing.value,):
        assert isinstance(error, SlimflowUserError) and "\n" not in str(error)


def test_one_model_loader_for_dense_and_pruned_directories(tmp_path, no_hub):
    from slimflow.checkpoint import save_pruned
    from slimflow.surgery import layer_widths, prune_channels, prune_heads
    from slimflow.adapters import get_adapter

    dense = tiny_model("llama_gqa")
    dense.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    loaded = load_model(str(tmp_path / "dense"), dtype="bf16", device="cpu")
    assert next(loaded.parameters()).dtype == torch.bfloat16 and not loaded.training
    assert read_config(tmp_path / "dense")["num_key_value_heads"] == 2

    adapter = get_adapter(dense)
    prune_heads(adapter, adapter.layers(dense)[0], 16, [1])
    prune_channels(adapter, adapter.layers(dense)[2], list(range(40)))
    save_pruned(dense, tmp_path / "pruned", tokenizer=tiny_tokenizer())
    pruned = load_model(str(tmp_path / "pruned"), dtype=torch.float32, device="cpu", attn_implementation="eager")
    assert layer_widths(pruned) == layer_widths(dense)
    assert source_dtype(str(tmp_path / "pruned")) == torch.float32
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 13]])
        assert torch.equal(pruned(ids).logits, dense(ids).logits)


def test_one_tokenizer_loader(tmp_path):
    tokenizer = tiny_tokenizer()
    assert load_tokenizer(tokenizer) is tokenizer  # objects pass through
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "tok")).pad_token == "</s>"
    assert load_tokenizer(str(tmp_path / "tok"), pad_with_eos=False).pad_token is None
