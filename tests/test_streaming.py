"""Streaming pruning (one decoder layer in memory at a time) against the in-memory path: identical weights and
metadata, and a peak host memory that stays within a budget several times smaller than the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slimflow import commands
from slimflow.checkpoint import _read_weights, load_pruned
from slimflow.streaming import StreamingError, prune_streaming, should_stream
from tests.tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _calibration_file(tmp_path: Path) -> Path:
    words = torch.randint(4, 128, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i}" for i in words))
    return path


def _source(tmp_path: Path, family: str, dtype=torch.float32, **overrides) -> Path:
    src = tmp_path / f"src-{family}"
    model = tiny_model(family, attn_implementation="sdpa", dtype=dtype, **overrides)
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    wa, wb = _read_weights(a, None), _read_weights(b, None)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype, name
        assert torch.equal(wa[name], wb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    pa, pb = (json.loads((p / "pruning.json").read_text()) for p in (a, b))
    for record in (pa, pb):
        for key in ("wall_time_s", "phase_times_s", "total_wall_time_s", "streaming"):
            record.pop(key)
    assert pa == pb


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("llama_gqa", {"tie_word_embeddings": True}),
                                              ("mistral", {})])
def test_streaming_prune_command_equals_in_memory(tmp_path, family, overrides):
    src, calib = _source(tmp_path, family, **overrides), _calibration_file(tmp_path)
    common = dict(model=str(src), calibration=str(calib), ratio=0.3, num_samples=6, seqlen=32, device="cpu",
                  progress=False)
    commands.prune(output=str(tmp_path / "mem"), streaming=False, **common)
    commands.prune(output=str(tmp_path / "str"), streaming=True, **common)
    assert json.loads((tmp_path / "str" / "pruning.json").read_text())["streaming"] is True
    assert (tmp_path / "str" / "model.safetensors.index.json").is_file()
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_pruned(tmp_path / "mem")(ids).logits, load_pruned(tmp_path / "str")(ids).logits)


def test_streaming_bf16_source_and_pruned_input(tmp_path):
    """A bf16 checkpoint pruned in float32 and saved in bf16, then a pruned (sharded) checkpoint pruned again."""
    src, calib = _source(tmp_path, "llama", dtype=torch.bfloat16), _calibration_file(tmp_path)
    common = dict(calibration=str(calib), num_samples=4, seqlen=32, device="cpu", dtype="float32",
                  save_dtype="bfloat16", progress=False)
    for mode in ("mem", "str"):
        commands.prune(model=str(src), output=str(tmp_path / f"{mode}1"), ratio=0.2, streaming=mode == "str", **common)
    _assert_same_checkpoint(tmp_path / "mem1", tmp_path / "str1")
    for mode in ("mem", "str"):  # the streamed first stage as the input of both second stages
        commands.prune(model=str(tmp_path / "str1"), output=str(tmp_path / f"{mode}2"), ratio=0.2,
                       streaming=mode == "str", **common)
    _assert_same_checkpoint(tmp_path / "mem2", tmp_path / "str2")


def test_streaming_refuses_whole_model_methods_and_leaves_nothing(tmp_path):
    src = _source(tmp_path, "llama")
    ids = torch.randint(3, 128, (2, 16))
    with pytest.raises(StreamingError, match="whole model"):
        prune_streaming(src, tmp_path / "out", ids, 0.2, method="taylor", device="cpu", progress=False)
    with pytest.raises(ValueError):
        prune_streaming(src, tmp_path / "out", ids, 0.99, device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-llama"]  # no output, no staging left


def test_should_stream_compares_weights_with_available_memory(tmp_path):
    src = _source(tmp_path, "llama")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert should_stream(src, torch.float32, memory=size)  # needs more than half of it
    assert not should_stream(src, torch.float32, memory=4 * size)
    assert not should_stream(src, torch.bfloat16, memory=int(1.5 * size))  # bf16 halves what the weights need
    assert not should_stream("org/hub-model", torch.float32, memory=1)


_PROBE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    import slimflow
    from slimflow.checkpoint import save_pruned
    from slimflow.models import load_model
    from slimflow.streaming import prune_streaming

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    work, mode = Path(sys.argv[1]), sys.argv[2]
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    # warm-up on a one-layer model: imports, thread pools and allocator arenas exist before the baseline
    prune_streaming(work / "warm", work / "warm-out", ids, 0.3, method="magnitude", device="cpu", progress=False,
                    overwrite=True)
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    if mode == "stream":
        prune_streaming(work / "src", work / mode, ids, 0.3, method="magnitude", device="cpu", progress=False)
    else:
        net = load_model(str(work / "src"), dtype=torch.float32, device="cpu")
        report = slimflow.prune(net, ids, 0.3, method="magnitude", device="cpu", progress=False)
        save_pruned(net, work / mode, report=report.to_dict())
    print(status("VmHWM:") - base)
""")


def _peak_above_baseline(work: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(work), mode], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_streaming_peak_memory_within_budget(tmp_path):
    """16 layers of 18.9 MB (fp32) = 302 MB of decoder weights against an 80 MB budget (4 layers + embeddings
    and head): streaming stays under it, the in-memory path does not, and both write the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(vocab_size=512, hidden_size=768, intermediate_size=1024, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=16, **shape))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "src")
    del model
    AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, **shape)).save_pretrained(tmp_path / "warm")
    budget = 80 * 2**20
    assert weights > 3.5 * budget
    streamed = _peak_above_baseline(tmp_path, "stream")
    assert streamed < budget, f"streaming peaked {streamed / 2**20:.1f} MiB above baseline"
    in_memory = _peak_above_baseline(tmp_path, "memory")
    assert in_memory > weights > budget  # the probe does see a whole model
    wa, wb = _read_weights(tmp_path / "stream", None), _read_weights(tmp_path / "memory", None)
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
