"""GGUF export checked in llama.cpp itself (llama-cpp-python): logits, greedy tokens and tokenization of every
exported file against slimflow's own model, and clear refusals that leave no partial file.

Tolerance: an f32 export runs in llama.cpp with an f32 KV cache, so the two runtimes compute the same f32
arithmetic in a different summation order (ggml's SIMD dot products vs PyTorch's GEMM); the difference measured
is ~1e-5 of the logit scale, and the tests allow `F32_ATOL = 5e-4` absolute (logits reach ~20 on the reference
model). A wrong head dimension, rope layout, bias or layer width moves logits by whole units, so the margin still
separates right from wrong by three orders of magnitude. f16/bf16/q8_0 files round the weights; for them the
tests check the rounding error's size and the greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HELD_OUT_TEXT, REFERENCE_MODEL, require_shared
from slimflow.checkpoint import load_pruned, save_pruned
from slimflow.cli import main
from slimflow.export.gguf import GGUFExportError, write_gguf
from slimflow.export.verify import compare_with_llama_cpp, load_llama_cpp
from slimflow.surgery import layer_widths, prune_channels, prune_heads
from tiny_models import tiny_model

import llama_cpp  # noqa: F401  a test dependency (pyproject [test]): a missing install fails, never skips

F32_ATOL = 5e-4
NEW_TOKENS = 32
TEXT = ("The history of the city begins in 1820, when settlers built a mill on the river. It cost $1,234.56 -- "
        "didn't it?\n\nYes: the naïve café owners' records say so.")
PROMPT = "The history of the city begins in the early nineteenth century, when"
_TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog while the river runs past the old mill",
    "in 1820 settlers built a mill; it cost $1,234.56 and didn't last long",
    "records of the naive cafe owners say the city grew around the river and the market square",
] * 20

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ----------------------------------------------------------------------------------------------- helpers


def bpe_tokenizer(pre: str = "gpt2", vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences (`pre`: gpt2 or qwen2 pre-tokenization)."""
    from tokenizers import ByteLevelBPETokenizer, Regex, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_TRAIN_TEXT, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend = bpe._tokenizer
    if pre in ("qwen2", "llama3"):
        if pre == "qwen2":
            backend.normalizer = normalizers.NFC()
        else:
            backend.model.ignore_merges = True  # as LLaMA-3's tokenizer.json has it
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def prune_by_plan(model, plan):
    """Remove whole KV groups and FFN channels: `plan[i] = (kept KV groups, kept channels)` for layer i."""
    from slimflow.adapters import get_adapter

    adapter = get_adapter(model)
    head_dim = adapter.head_dim(model)
    for layer, (units, channels) in zip(adapter.layers(model), plan):
        prune_heads(adapter, layer, head_dim, units)
        prune_channels(adapter, layer, channels)
    return model


def export_and_compare(model, tokenizer, directory: Path, dtype: str = "f32", text: str = TEXT, plain_hf=False):
    """save_pruned -> `slimflow export` -> llama.cpp, compared with `load_pruned` of the same checkpoint
    (`plain_hf`: a dense model saved with `save_pretrained`, not by slimflow)."""
    if plain_hf:
        model.save_pretrained(directory / "ckpt")
        tokenizer.save_pretrained(directory / "ckpt")
    else:
        save_pruned(model, directory / "ckpt", tokenizer=tokenizer, overwrite=True)
    out = directory / f"model-{dtype}.gguf"
    assert main(["export", "--format", "gguf", "--model", str(directory / "ckpt"), "--output", str(out),
                 "--dtype", dtype, "--overwrite", "true"]) == 0
    reference = load_pruned(directory / "ckpt", dtype=torch.float32)
    ids = tokenizer(text)["input_ids"]
    llm = load_llama_cpp(out, n_ctx=len(ids) + NEW_TOKENS + 8)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(
        text, add_special_tokens=False)["input_ids"]
    return compare_with_llama_cpp(reference, out, ids, NEW_TOKENS, llm=llm), out


def assert_equivalent(result, atol=F32_ATOL):
    assert result.max_abs_logit_diff < atol, result
    assert result.tokens_matched == NEW_TOKENS, result


def record(name, result, path):
    """Print the measurement (visible with -s / in CI logs) for docs/results.md."""
    print(f"\nGGUF {name}: max|dlogit| {result.max_abs_logit_diff:.2e} (logit scale {result.logit_scale:.1f}), "
          f"greedy {result.tokens_matched}/{result.new_tokens}, file {Path(path).stat().st_size} B")


# ----------------------------------------------------------------------------------------------- tiny models


def test_gqa_pruned_by_kv_groups_with_head_dim_not_hidden_over_heads(tmp_path):
    # head_dim 32 with hidden 64 and 4 heads in layer 0: llama.cpp's fallback hidden/heads[0] would be 16, so
    # only an explicit key_length makes this file match. (The 50%-pruned reference model covers a pruned layer 0.)
    model = tiny_model("llama_gqa", head_dim=32, vocab_size=420)
    prune_by_plan(model, [([0, 1], list(range(0, 96, 2))), ([1], list(range(70))), ([0], list(range(5, 96)))])
    assert [(w.num_attention_heads, w.num_key_value_heads) for w in layer_widths(model)] == [(4, 2), (2, 1), (2, 1)]
    result, path = export_and_compare(model, bpe_tokenizer(), tmp_path)
    record("tiny GQA pruned", result, path)
    assert_equivalent(result)


def test_qwen2_biases_and_tied_embeddings(tmp_path):
    model = tiny_model("qwen2", vocab_size=400)
    prune_by_plan(model, [([0], list(range(40))), ([1], list(range(96))), ([0, 1], list(range(1, 90)))])
    tokenizer = bpe_tokenizer("qwen2")
    result, path = export_and_compare(model, tokenizer, tmp_path)
    record("tiny Qwen2 pruned", result, path)
    assert_equivalent(result)
    # the biases matter: the same file without them is measurably different
    model2 = load_pruned(tmp_path / "ckpt")
    for layer in model2.model.layers:
        layer.self_attn.q_proj.bias.data.zero_()
    write_gguf(model2, tokenizer, tmp_path / "nobias.gguf", dtype="f32")
    ids = tokenizer(TEXT)["input_ids"]
    no_bias = compare_with_llama_cpp(load_pruned(tmp_path / "ckpt"), tmp_path / "nobias.gguf", ids, 4)
    assert no_bias.max_abs_logit_diff > 100 * F32_ATOL


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "rope_theta": 10000.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_dense_llama_with_rope_scaling(tmp_path, rope):
    model = tiny_model("llama", vocab_size=400, rope_parameters=rope)
    result, path = export_and_compare(model, bpe_tokenizer(), tmp_path)
    record(f"tiny LLaMA dense, {rope['rope_type']} rope", result, path)
    assert_equivalent(result)


def test_llama3_style_tokenizer(tmp_path):
    tokenizer = bpe_tokenizer("llama3")
    result, path = export_and_compare(tiny_model("llama", vocab_size=400), tokenizer, tmp_path)
    record("tiny LLaMA dense, LLaMA-3 pre-tokenizer", result, path)
    assert_equivalent(result)
    tokenizer.backend_tokenizer.model.ignore_merges = False  # llama.cpp's llama-bpe cannot express this
    with pytest.raises(GGUFExportError, match="ignore_merges=False"):
        write_gguf(tiny_model("llama", vocab_size=400), tokenizer, tmp_path / "x.gguf")


def test_dense_mistral(tmp_path):
    result, path = export_and_compare(tiny_model("mistral", vocab_size=400, sliding_window=None), bpe_tokenizer(),
                                      tmp_path, plain_hf=True)
    record("tiny Mistral dense (plain Hugging Face directory)", result, path)
    assert_equivalent(result)
    summary = write_gguf(tiny_model("mistral", vocab_size=400), bpe_tokenizer(), tmp_path / "w.gguf")
    assert "sliding window of 8 tokens" in summary["warnings"][0]


@pytest.mark.parametrize("dtype,atol", [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.3)])
def test_reduced_precision_exports(tmp_path, dtype, atol):
    model = tiny_model("llama_gqa", vocab_size=400)
    prune_by_plan(model, [([1], list(range(64))), ([0, 1], list(range(96))), ([0], list(range(32)))])
    result, path = export_and_compare(model, bpe_tokenizer(), tmp_path, dtype=dtype)
    record(f"tiny GQA {dtype}", result, path)
    # rounded (so the dtype really changed), but only by weight rounding; greedy tokens of a random tiny model
    # sit near ties, so they are compared on the trained reference model instead
    assert F32_ATOL / 100 < result.max_abs_logit_diff < atol


# ----------------------------------------------------------------------------------------------- reference model


@pytest.fixture(scope="module")
def reference():
    require_shared(REFERENCE_MODEL)
    require_shared(HELD_OUT_TEXT)
    from slimflow.data.calibration import calibration_ids
    from slimflow.models import load_tokenizer

    tokenizer = load_tokenizer(str(REFERENCE_MODEL))
    calib = calibration_ids(str(HELD_OUT_TEXT), tokenizer, num_samples=8, seqlen=128, sampling="tail")
    return tokenizer, calib


@pytest.mark.integration
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5])
def test_reference_model_dense_and_pruned(reference, tmp_path, ratio):
    import slimflow
    from slimflow.models import load_model

    tokenizer, calib = reference
    model = load_model(str(REFERENCE_MODEL), dtype="float32", device="cpu")
    if ratio:
        slimflow.prune(model, calib, ratio=ratio, progress=False)
        widths = layer_widths(model)
        assert len({w.num_attention_heads for w in widths}) > 1 and len({w.intermediate_size for w in widths}) > 1
    result, path = export_and_compare(model, tokenizer, tmp_path, text=PROMPT)
    record(f"ref-llama-27m ratio {ratio}", result, path)
    assert_equivalent(result)
    if ratio == 0.2:  # the serving dtypes on a trained model: rounding-sized differences, same greedy text
        for dtype, atol, matched in (("f16", 0.1, NEW_TOKENS), ("q8_0", 0.5, 8)):
            result, path = export_and_compare(model, tokenizer, tmp_path, dtype=dtype, text=PROMPT)
            record(f"ref-llama-27m ratio {ratio} {dtype}", result, path)
            assert result.max_abs_logit_diff < atol and result.tokens_matched >= matched, result


# ----------------------------------------------------------------------------------------------- refusals


def _no_partial_files(directory: Path):
    return [p.name for p in directory.iterdir() if ".partial" in p.name or p.suffix == ".gguf"]


def test_unsupported_and_corrupt_inputs_fail_clearly_and_leave_nothing(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_models import tiny_tokenizer

    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.gguf"

    # an unsupported family
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).eval()
    with pytest.raises(GGUFExportError, match="model_type='gpt2'.*supported: llama, mistral, qwen2"):
        write_gguf(gpt2, bpe_tokenizer(), target)
    # a tokenizer GGUF cannot express (word-level)
    with pytest.raises(GGUFExportError, match="BPE tokenizers only"):
        write_gguf(tiny_model("llama"), tiny_tokenizer(), target)
    # a rope scaling deci does not reproduce
    with pytest.raises(GGUFExportError, match="rope types"):
        write_gguf(tiny_model("llama", vocab_size=400, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 1e4}), bpe_tokenizer(), target)
    # NaN weights
    bad = tiny_model("llama", vocab_size=400)
    bad.model.layers[2].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(GGUFExportError, match="blk.2.ffn_down.weight holds NaN"):
        write_gguf(bad, bpe_tokenizer(), target)
    with pytest.raises(GGUFExportError, match="dtype 'q4'"):
        write_gguf(tiny_model("llama", vocab_size=400), bpe_tokenizer(), target, dtype="q4")
    assert _no_partial_files(out) == []

    # through the command line: a truncated safetensors file, a missing directory, an existing output, bad options
    ckpt = tmp_path / "ckpt"
    save_pruned(tiny_model("llama", vocab_size=400), ckpt, tokenizer=bpe_tokenizer())
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cli_fails(["export", "--model", str(ckpt), "--output", str(target)], GGUFExportError,
              r"ckpt/model.safetensors is not a complete safetensors file", capsys)
    cli_fails(["export", "--model", str(tmp_path / "missing"), "--output", str(target)], GGUFExportError,
              "no model directory", capsys)
    for option in (["--format", "onnx"], ["--dtype", "q4"]):
        # refused by the command's schema, before any work
        assert main(["export", "--model", str(ckpt), "--output", str(target), *option]) == 2
    assert _no_partial_files(out) == []
    target.write_bytes(b"keep me")
    cli_fails(["export", "--model", str(ckpt), "--output", str(target)], FileExistsError, "--overwrite", capsys)
    assert target.read_bytes() == b"keep me"


def cli_fails(argv, error, match, capsys):
    """The command refuses with `match` in its message: raised as `error`, or reported as exit status 2."""
    import re

    try:
        status = main(argv)
    except error as raised:
        assert re.search(match, str(raised)) and "\n" not in str(raised), raised
        return
    assert status == 2 and re.search(match, capsys.readouterr().err)


def test_write_failing_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    """A disk that fills up while the tensors are written: the partial file is removed, the old one kept."""
    from gguf import GGUFWriter

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    real = GGUFWriter.write_tensors_to_file

    def disk_full(self, **kwargs):
        self.fout[0].write(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_gguf(tiny_model("llama", vocab_size=400), bpe_tokenizer(), target, dtype="f32", overwrite=True)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", real)


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.gguf"
    write_gguf(tiny_model("llama", vocab_size=400), bpe_tokenizer(), target, dtype="f32")
    before = target.read_bytes()
    bad = tiny_model("llama", vocab_size=400)
    bad.lm_head.weight.data[3, 3] = float("inf")
    with pytest.raises(GGUFExportError, match="output.weight"):
        write_gguf(bad, bpe_tokenizer(), target, overwrite=True)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_written_metadata_is_what_deci_reads(tmp_path):
    """Per-layer arrays and the explicit head size, read back with gguf's own reader."""
    from gguf import GGUFReader

    model = tiny_model("llama_gqa", head_dim=32, vocab_size=420)
    prune_by_plan(model, [([1], list(range(64))), ([0, 1], list(range(96))), ([0], list(range(32)))])
    write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf", dtype="f32")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "deci"
    assert value("deci.attention.head_count") == [2, 4, 2]
    assert value("deci.attention.head_count_kv") == [1, 2, 1]
    assert value("deci.feed_forward_length") == [64, 96, 32]
    assert value("deci.attention.key_length") == value("deci.attention.value_length") == 32
    assert value("deci.rope.dimension_count") == 32
    assert len(value("tokenizer.ggml.tokens")) == 420  # padded to the embedding rows
    assert value("tokenizer.ggml.tokens")[-1] == "[PAD419]"
    json.dumps(value("tokenizer.ggml.merges")[:3])


def test_export_callback_writes_gguf_at_fit_end(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from slimflow.lightning import Export

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = tiny_model("llama_gqa", vocab_size=400), bpe_tokenizer()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    with pytest.raises(GGUFExportError, match="q4"):
        Export(gguf="q4")
    module = Module()
    data = DataLoader(list(torch.randint(3, 400, (4, 16), generator=torch.Generator().manual_seed(0))), batch_size=2)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Export(gguf="f32", adapter=False, base=False)])
    trainer.fit(module, train_dataloaders=data)
    path = tmp_path / "export" / "model.gguf"
    ids = module.tokenizer(TEXT)["input_ids"]
    assert_equivalent(compare_with_llama_cpp(module.model.eval(), path, ids, NEW_TOKENS))

    # a tokenizer GGUF cannot hold is refused when fit starts, before any training
    from tiny_models import tiny_tokenizer

    module = Module()
    module.tokenizer = tiny_tokenizer()
    trainer = pl.Trainer(default_root_dir=tmp_path / "b", max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Export(gguf="f16", merged=False, adapter=False, base=False)])
    with pytest.raises(GGUFExportError, match="BPE tokenizers only"):
        trainer.fit(module, train_dataloaders=data)
    assert not (tmp_path / "b" / "export").exists()


def spm_tokenizer(vocab_size: int = 420):
    """A LLaMA-2-style tokenizer: BPE with byte fallback over "▁"-escaped text, ids 3..258 the byte pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_tok.train_from_iterator(_TRAIN_TEXT, trainers.BpeTrainer(vocab_size=vocab_size - 256,
                                                                    special_tokens=["<unk>", "<s>", "</s>"],
                                                                    show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in ("<unk>", "<s>", "</s>")]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": []})
    return tokenizer


def test_sentencepiece_style_tokenizer_with_byte_fallback(tmp_path):
    tokenizer = spm_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == 1 and any(3 <= i < 259 for i in ids)  # BOS added, accented letters fall back to bytes
    model = tiny_model("llama", vocab_size=len(tokenizer) + 4)
    result, path = export_and_compare(model, tokenizer, tmp_path)
    record("tiny LLaMA dense, SentencePiece-style tokenizer", result, path)
    assert_equivalent(result)
    llm = load_llama_cpp(path, n_ctx=256)
    assert llm.tokenize(TEXT.encode(), add_bos=True) == ids
    # words run together at random: overlapping merge candidates everywhere, so the merge order (the scores)
    # decides; equal scores (llama.cpp then merges leftmost first) mis-tokenise about a quarter of this text
    rng = np.random.default_rng(0)
    soup = "".join(w + rng.choice(["", " "]) for w in rng.choice(" ".join(_TRAIN_TEXT[:3]).split(), 400))
    assert llm.tokenize(soup.encode(), add_bos=False) == tokenizer(soup, add_special_tokens=False)["input_ids"]
    # llama-cpp-python's detokenize keeps the "▁" prefix llama.cpp added as a leading space; HF strips it
    assert llm.detokenize(ids[1:]).decode().removeprefix(" ") == tokenizer.decode(ids[1:])
