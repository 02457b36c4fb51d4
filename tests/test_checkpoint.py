"""Pruned checkpoints: exact round trips through both reload paths, safe writes, clear errors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import require_shared
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, padded_batch, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import slimflow.checkpoint as checkpoint
from slimflow.adapters import get_adapter
from slimflow.checkpoint import NotASlimflowCheckpointError, load_pruned, save_pruned
from slimflow.surgery import count_parameters, layer_widths, prune_channels, prune_heads

HEAD_DIM = 16
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _prune_non_uniform(model):
    """Drop a different share of KV groups and FFN channels in each layer."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n_units = model.config.num_key_value_heads
    prune_heads(adapter, layers[0], HEAD_DIM, list(range(1, n_units)))
    prune_channels(adapter, layers[0], list(range(0, 96, 2)))
    prune_heads(adapter, layers[-1], HEAD_DIM, [0] if n_units == 2 else [0, 2, 3])
    prune_channels(adapter, layers[1], list(range(5, 90)))
    return model


def _pruned(family="llama_gqa", dtype=torch.float32, **overrides):
    attn = "eager" if family == "gemma2" else "sdpa"  # Gemma-2's soft-capped attention has no SDPA path
    return _prune_non_uniform(tiny_model(family, attn, dtype=dtype, **overrides))


def _logits(model):
    """Logits at the real (non-padding) positions of a left-padded batch."""
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[attention_mask.bool()]


def _greedy(model):
    input_ids, attention_mask = padded_batch()
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)


def _from_pretrained(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True, **kwargs
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _files(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "family, dtype",
    [(family, torch.float32) for family in FAMILIES] + [("llama_gqa", torch.bfloat16), ("qwen2", torch.bfloat16)],
)
def test_both_reload_paths_are_exact(tmp_path, family, dtype):
    model = _pruned(family, dtype)
    path = save_pruned(model, tmp_path / "pruned")

    assert not [name for name in _files(path) if name.endswith(PICKLE_SUFFIXES)]
    assert {"model.safetensors", "config.json", "pruning.json", "modeling_slimflow.py"} <= set(_files(path))

    expected_logits, expected_tokens = _logits(model), _greedy(model)
    # Gemma-2 reloads eager like it was built: older transformers' SDPA path for it skips the soft-capping
    attn = {"attn_implementation": "eager"} if family == "gemma2" else {}
    for reloaded in (load_pruned(path, **attn), _from_pretrained(path, **attn)):
        assert reloaded.dtype == dtype
        assert layer_widths(reloaded) == layer_widths(model)
        assert torch.equal(_logits(reloaded), expected_logits)
        assert torch.equal(_greedy(reloaded), expected_tokens)


def test_static_cache_generation(tmp_path):
    model = _pruned("llama_gqa")
    path = save_pruned(model, tmp_path / "pruned")
    input_ids, attention_mask = padded_batch()
    expected = _greedy(model)
    for reloaded in (load_pruned(path), _from_pretrained(path)):
        tokens = reloaded.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
            cache_implementation="static",
        )
        assert torch.equal(tokens, expected)


def test_config_and_pruning_record(tmp_path):
    model = _pruned("llama_gqa")
    dense_params = count_parameters(tiny_model("llama_gqa"))
    path = save_pruned(model, tmp_path / "pruned", report={"method": "slimgpt", "params_before": None})

    config = json.loads((path / "config.json").read_text())
    widths = [w.to_dict() for w in layer_widths(model)]
    assert config["slimflow_layer_widths"] == widths
    assert config["per_layer_config"]["0"] == {"num_key_value_heads": 1, "intermediate_size": 48}
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_slimflow.SlimflowLlamaForCausalLM"}
    # Global sizes stay dense: the layers are cut from them.
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 96)

    record = json.loads((path / "pruning.json").read_text())
    assert record["method"] == "slimgpt"
    assert record["params_before"] == dense_params
    assert record["params_after"] == count_parameters(model) < dense_params
    assert record["layer_widths"] == widths


def test_report_object_and_generation_config(tmp_path):
    class Report:
        def to_dict(self):
            return {"params_before": 123, "ratio": 0.25}

    model = _pruned("mistral")
    model.generation_config.max_new_tokens = 17
    path = save_pruned(model, tmp_path / "pruned", report=Report())
    record = json.loads((path / "pruning.json").read_text())
    assert (record["params_before"], record["ratio"]) == (123, 0.25)
    assert load_pruned(path).generation_config.max_new_tokens == 17


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tmp_path, tied):
    model = _pruned("llama", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    path = save_pruned(model, tmp_path / "pruned")

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert ("lm_head.weight" in handle.keys()) != tied
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] == tied
    for reloaded in (load_pruned(path), _from_pretrained(path)):
        assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
        assert torch.equal(_logits(reloaded), _logits(model))


def test_load_casts_dtype_like_from_pretrained(tmp_path):
    path = save_pruned(_pruned("qwen2"), tmp_path / "pruned")
    ours = load_pruned(path, dtype=torch.bfloat16, device="cpu")
    theirs = _from_pretrained(path, dtype=torch.bfloat16)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(_logits(ours), _logits(theirs))


def test_reload_then_save_again_round_trips(tmp_path):
    model = _pruned("qwen2")
    first = _from_pretrained(save_pruned(model, tmp_path / "first"))
    second = load_pruned(save_pruned(first, tmp_path / "second"))
    assert layer_widths(second) == layer_widths(model)
    assert torch.equal(_logits(second), _logits(model))


def test_tokenizer_is_saved(tmp_path):
    path = save_pruned(_pruned(), tmp_path / "pruned", tokenizer=tiny_tokenizer())
    assert AutoTokenizer.from_pretrained(path)("w5 w7")["input_ids"] == [5, 7]


def test_attention_implementation_is_selectable(tmp_path):
    model = _pruned("llama_gqa")
    eager = load_pruned(save_pruned(model, tmp_path / "pruned"), attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(_logits(eager), _logits(model), atol=1e-5, rtol=1e-5)


def test_dense_hf_directory_loads(tmp_path):
    model = tiny_model("llama", "sdpa")
    model.save_pretrained(tmp_path / "dense")
    reloaded = load_pruned(tmp_path / "dense")
    assert layer_widths(reloaded) == layer_widths(model)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_modeling_file_needs_only_torch_and_transformers(tmp_path):
    path = save_pruned(_pruned(), tmp_path / "pruned")
    tree = ast.parse((path / "modeling_slimflow.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or ".").split(".")[0])
    assert roots <= {"__future__", "copy", "torch", "transformers"}


def test_existing_path_is_refused_unless_overwrite(tmp_path):
    path = save_pruned(_pruned(), tmp_path / "pruned", tokenizer=tiny_tokenizer())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(_pruned(), path)

    model = _pruned("llama")
    save_pruned(model, path, overwrite=True)
    assert "tokenizer.json" not in _files(path)
    assert torch.equal(_logits(load_pruned(path)), _logits(model))
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch, existing):
    path = tmp_path / "pruned"
    old_model = _pruned("llama")
    if existing:
        save_pruned(old_model, path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Fails after the weights and config are written, before pruning.json.
    monkeypatch.setattr(checkpoint, "_pruning_record", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(_pruned("llama_gqa"), path, overwrite=True)

    assert [p.name for p in tmp_path.iterdir()] == (["pruned"] if existing else [])
    if existing:
        assert torch.equal(_logits(load_pruned(path)), _logits(old_model))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_pruned(tmp_path / "missing")

    (tmp_path / "empty").mkdir()
    with pytest.raises(NotASlimflowCheckpointError, match="config.json"):
        load_pruned(tmp_path / "empty")

    path = save_pruned(_pruned(), tmp_path / "pruned")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_pruned(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pruned(path)


def test_weights_that_do_not_match_the_widths_are_refused(tmp_path):
    path = save_pruned(_pruned(), tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())
    config["slimflow_layer_widths"][1]["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotASlimflowCheckpointError, match="do not match"):
        load_pruned(path)


REFERENCE_MODEL = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "ref-llama-27m"


@pytest.mark.integration
def test_reference_model_round_trip(tmp_path):
    require_shared(REFERENCE_MODEL)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.layers(model)):
        prune_heads(adapter, layer, 32, list(range(index % 4, 12)))
        prune_channels(adapter, layer, list(range(0, 1024 - 64 * (index % 5))))
    path = save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)

    inputs = tokenizer(["It was a dark and stormy night; the rain"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    for reloaded in (load_pruned(path), _from_pretrained(path)):
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs).logits, expected)
        assert torch.equal(reloaded.generate(**inputs, max_new_tokens=12, do_sample=False), tokens)


def test_both_reload_paths_expose_the_same_global_sizes(tmp_path):
    """`config.num_key_value_heads` & co. read the same value on both reload paths without raising: the dense
    skeleton's sizes the layers are cut from; every layer's own widths are in `slimflow_layer_widths` and in
    the modules."""
    model = tiny_model("llama_gqa")
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        prune_heads(adapter, layer, HEAD_DIM, [1])
        prune_channels(adapter, layer, list(range(40 + 8 * i)))
    path = save_pruned(model, tmp_path / "pruned")
    for reloaded in (load_pruned(path), _from_pretrained(path)):
        config = reloaded.config
        sizes = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
        assert sizes == (4, 2, 96)
        assert [w["intermediate_size"] for w in config.slimflow_layer_widths] == [40, 48, 56]
        assert [w["num_key_value_heads"] for w in config.slimflow_layer_widths] == [1, 1, 1]
        assert layer_widths(reloaded) == layer_widths(model)


def _layer_attributes(model):
    """Every per-layer size a user can read off a reloaded model: config lists and module attributes."""
    adapter = get_adapter(model)
    out = []
    for layer in adapter.layers(model):
        attn, mlp = adapter.attn(layer), adapter.ffn(layer)
        out.append({
            "num_heads": attn.num_heads, "num_key_value_heads": attn.num_key_value_heads,
            "num_key_value_groups": attn.num_key_value_groups, "head_dim": attn.head_dim,
            "intermediate_size": mlp.intermediate_size,
            "attn_config": (attn.config.num_attention_heads, attn.config.num_key_value_heads),
            "shapes": tuple(tuple(p.shape) for p in layer.parameters()),
        })
    return out


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen2", "phi3"])
def test_both_reload_paths_expose_the_same_per_layer_attributes(tmp_path, family):
    """`load_pruned` and `from_pretrained(trust_remote_code=True)` agree attribute by attribute: the global
    config fields are the dense skeleton's (both read without raising), the per-layer widths are
    `config.slimflow_layer_widths` and the attention / MLP modules' own attributes, which match the shapes."""
    model = _pruned(family)
    dense = tiny_config(family)
    path = save_pruned(model, tmp_path / "pruned")
    truth = [w.to_dict() for w in layer_widths(model)]
    assert len({w["num_key_value_heads"] for w in truth}) > 1  # the layers really differ
    seen = []
    for reloaded in (load_pruned(path), _from_pretrained(path)):
        config = reloaded.config
        globals_ = {key: getattr(config, key) for key in
                    ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", "hidden_size")}
        assert globals_ == {key: getattr(dense, key) for key in globals_}
        assert config.slimflow_layer_widths == truth
        attributes = _layer_attributes(reloaded)
        for attrs, width in zip(attributes, truth):
            assert (attrs["num_heads"], attrs["num_key_value_heads"], attrs["intermediate_size"]) == (
                width["num_attention_heads"], width["num_key_value_heads"], width["intermediate_size"])
            assert attrs["num_key_value_groups"] == width["num_attention_heads"] // width["num_key_value_heads"]
            assert attrs["head_dim"] == dense.head_dim
        seen.append((globals_, config.slimflow_layer_widths, attributes))
    assert seen[0] == seen[1]
