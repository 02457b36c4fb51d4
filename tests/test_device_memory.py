"""Device memory of the whole-model passes: the estimate, the check before any work, and out-of-memory errors
reported as one line (the real-GPU versions of these checks are in tests/test_gpu.py)."""

import pytest
import torch

import slimflow
import slimflow.api
from slimflow.adapters import get_adapter
from slimflow.cli import main
from slimflow.device_memory import (check_whole_model_fits, format_bytes, sampling_cache_bytes, weight_bytes,
                                    whole_model_need)
from slimflow.errors import InsufficientMemoryError, out_of_memory_in
from tests.tiny_models import tiny_model, tiny_tokenizer

CUDA = torch.device("cuda", 0)


def _ids(n=8, length=16, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen2"])
def test_sampling_cache_bytes_is_what_the_cache_holds_after_seqlen_tokens(family):
    model = tiny_model(family)
    with torch.no_grad():
        cache = model(input_ids=_ids(5, 24), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert sampling_cache_bytes(model.config, 5, 24, torch.float32) == held


def test_weight_bytes_counts_parameters_and_buffers():
    model = tiny_model("llama", dtype=torch.bfloat16)
    expected = sum(p.numel() * 2 for p in model.parameters()) + sum(b.numel() * b.element_size()
                                                                     for b in model.buffers())
    assert weight_bytes(model) == expected


def test_need_counts_the_weights_once_when_the_model_lives_elsewhere_and_the_copy_when_it_lives_there():
    model = tiny_model("llama_gqa")
    weights, cache = weight_bytes(model), sampling_cache_bytes(model.config, 64, 32, torch.float32)
    away = whole_model_need(model, CUDA, sampling_batch=64, seqlen=32, search_copy=True)
    assert away == {"weights": weights, "cache": cache, "copy": 0, "total": weights + cache}
    here = whole_model_need(model, torch.device("cpu"), sampling_batch=64, seqlen=32, search_copy=True)
    assert here == {"weights": 0, "cache": cache, "copy": weights, "total": max(cache, weights)}
    assert whole_model_need(model, CUDA)["total"] == weights


def test_check_refuses_one_byte_short_and_names_the_numbers_and_the_fixes():
    model = tiny_model("llama_gqa")
    need = whole_model_need(model, CUDA, sampling_batch=64, seqlen=32)["total"]
    check_whole_model_fits(model, CUDA, "the adaptive schedule", sampling_batch=64, seqlen=32, free=need)
    with pytest.raises(InsufficientMemoryError) as caught:
        check_whole_model_fits(model, CUDA, "the adaptive schedule", sampling_batch=64, seqlen=32, free=need - 1)
    text = str(caught.value)
    assert text.startswith(f"the adaptive schedule runs the whole model on {CUDA}: it needs at least")
    assert "key/value cache of 64 sampled sequences of 32 tokens" in text and "--generated-samples 0" in text
    assert "log_increase" in text and "\n" not in text
    # a tiny model's need reads in MiB, never as 0.0 GiB
    assert f"it needs at least {format_bytes(need)} there" in text and "0.0 GiB" not in text
    # without sampling the cache is not counted: the weights alone fit
    check_whole_model_fits(model, CUDA, "the adaptive schedule", free=weight_bytes(model))
    check_whole_model_fits(model, torch.device("cpu"), "the adaptive schedule", sampling_batch=64, seqlen=32, free=0)


def test_format_bytes_uses_mib_below_one_gib():
    assert format_bytes(0) == "0 MiB"
    assert format_bytes(300 << 20) == "300 MiB"
    assert format_bytes((1 << 30) - 1) == "1024 MiB"
    assert format_bytes(1 << 30) == "1.0 GiB"
    assert format_bytes(int(2.26 * (1 << 30))) == "2.3 GiB"


def test_prune_refuses_a_device_too_small_before_any_work(monkeypatch):
    model = tiny_model("llama_gqa")
    before = [p.detach().clone() for p in model.parameters()]
    need = whole_model_need(model, CUDA, sampling_batch=64, seqlen=16)["total"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 10 * need))

    def no_sampling(*args, **kwargs):
        raise AssertionError("the device must be refused before sampling")

    monkeypatch.setattr("slimflow.data.generated.sample_sequences", no_sampling)
    with pytest.raises(InsufficientMemoryError, match="sampled sequences of 16 tokens"):
        slimflow.prune(model, _ids(), 0.3, schedule="adaptive", device=CUDA, progress=False)
    need = whole_model_need(model, CUDA, sampling_batch=8, seqlen=16)["total"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 10 * need))
    with pytest.raises(InsufficientMemoryError, match="sampling calibration sequences runs the whole model") as caught:
        slimflow.prune(model, _ids(), 0.3, device=CUDA, progress=False, generated_samples=8)
    assert "--generated-samples 0" in str(caught.value) and "log_increase" not in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_energy_on_a_named_device_is_the_same_and_leaves_the_model_home():
    from slimflow.allocation import residual_gradient_energy

    model = tiny_model("llama", num_hidden_layers=3)
    flags = [p.requires_grad for p in model.parameters()]
    here = residual_gradient_energy(model, get_adapter(model), _ids(), 4)
    named = residual_gradient_energy(model, get_adapter(model), _ids(), 4, device="cpu")
    assert here == named and len(here) == 3
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


OOM_TEXT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.99 GiB of which "
            "1.50 GiB is free. Including non-PyTorch memory, this process has 22.40 GiB memory in use.")


def test_out_of_memory_message_is_one_line_with_what_was_asked_and_free():
    assert out_of_memory_in(ValueError("no")) is None
    message = out_of_memory_in(torch.OutOfMemoryError(OOM_TEXT))
    assert message.startswith("out of memory on the GPU (tried to allocate 2.00 GiB; 1.50 GiB of 23.99 GiB free)")
    assert "--batch-size" in message and "\n" not in message
    try:
        try:
            raise torch.OutOfMemoryError(OOM_TEXT)
        except torch.OutOfMemoryError as error:
            raise RuntimeError("pruning layer 3 failed") from error
    except RuntimeError as wrapped:
        assert out_of_memory_in(wrapped) == message


CUSOLVER_TEXT = ("cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR, when calling `cusolverDnCreate(handle)`. If you keep "
                 "seeing this error, you may use `torch.backends.cuda.preferred_linalg_library()` to try linear "
                 "algebra operators with other supported backends.")


@pytest.mark.parametrize("text, named", [
    (CUSOLVER_TEXT, "CUSOLVER_STATUS_INTERNAL_ERROR in cusolverDnCreate"),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
     "CUBLAS_STATUS_ALLOC_FAILED in cublasCreate"),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")])
def test_a_library_that_cannot_set_up_on_a_full_card_reads_as_out_of_memory(text, named):
    message = out_of_memory_in(RuntimeError(text))
    assert message.startswith(f"out of memory on the GPU ({named}")
    assert "nvidia-smi" in message and "--batch-size" in message and "\n" not in message
    try:
        try:
            raise RuntimeError(text)
        except RuntimeError as error:
            raise ValueError("scoring the candidates failed") from error
    except ValueError as wrapped:
        assert out_of_memory_in(wrapped) == message


def test_other_library_errors_are_not_taken_for_out_of_memory():
    """An internal error inside a kernel call, not at handle creation, is a defect: its traceback must show."""
    assert out_of_memory_in(RuntimeError("CUDA error: CUBLAS_STATUS_INTERNAL_ERROR when calling `cublasSgemm( handle, "
                                         "opa, opb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`")) is None
    assert out_of_memory_in(ValueError(CUSOLVER_TEXT)) is None


@pytest.mark.parametrize("failure", [lambda: torch.OutOfMemoryError(OOM_TEXT), lambda: RuntimeError(CUSOLVER_TEXT)])
def test_prune_command_reports_out_of_memory_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, failure):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    words = torch.randint(3, 128, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "calib.txt").write_text(" ".join(f"w{i}" for i in words))
    real = slimflow.api.prune
    capsys.readouterr()

    def prune_then_run_out(model, *args, **kwargs):  # fails mid-prune, after the model changed
        real(model, *args, **kwargs)
        raise failure()

    monkeypatch.setattr(slimflow.api, "prune", prune_then_run_out)
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tmp_path / "dense"), "--calibration", str(tmp_path / "calib.txt"),
                 "--output", str(out), "--num-samples", "4", "--seqlen", "16", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert errors == [f"error: {out_of_memory_in(failure())}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense"]  # no output, no staging folder
