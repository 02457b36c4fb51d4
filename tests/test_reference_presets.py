"""The presets of benchmarks/pretrain_reference.py: sizes that travel, the shapes they promise, the tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.pretrain_reference import PRESETS, Windows, build_model, lr_at, save_tokenizer
from conftest import SHARED, require_shared


@pytest.mark.parametrize("preset,layers,kv,biases", [("ref-llama-gqa-12m", 8, 4, False), ("ref-qwen2-12m", 9, 6, True)])
def test_presets_fit_12m_parameters_with_their_shapes(preset, layers, kv, biases):
    model = build_model(preset, seed=0)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert params <= 12_000_000 and model.config.tie_word_embeddings
    attn = model.model.layers[0].self_attn
    assert len(model.model.layers) == layers and attn.k_proj.out_features == kv * 32
    assert (attn.q_proj.bias is not None) == biases and model.config.vocab_size == 8192


def test_schedule_and_data_order_are_fixed_by_steps_and_seed():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1) and lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    stream = torch.arange(1000)
    a, b = Windows(stream, 16, 4, seed=0), Windows(stream, 16, 4, seed=0)
    batches = [a.next() for _ in range(40)]  # crosses epochs (62 windows per epoch)
    assert all(torch.equal(x, b.next()) for x in batches)
    assert all(torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.long)) for x in batches)
    assert not torch.equal(batches[0], Windows(stream, 16, 4, seed=1).next())


def test_qwen2_model_loads_the_shared_tokenizer_unchanged(tmp_path):
    from transformers import AutoTokenizer

    shared = str(require_shared(SHARED / "models" / "ref-llama-27m"))
    build_model("tiny-qwen2", seed=0).config.save_pretrained(tmp_path)
    save_tokenizer(shared, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["pad_token"] is None
    text = "The end.\n<|endoftext|>\nCHAPTER I"
    got, want = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(shared)
    assert len(got) == 8192 and got(text)["input_ids"] == want(text)["input_ids"]
    assert max(got(text)["input_ids"]) < 8192
