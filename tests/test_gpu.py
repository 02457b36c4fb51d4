"""GPU checks of the engine, run on a CUDA machine only: `python -m pytest tests/test_gpu.py -m gpu -q`.

They are deselected by default (pyproject `addopts = -m 'not gpu'`) and skip where CUDA is absent."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

import slimflow
from slimflow.algorithms.hessian import HessianAccumulator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def calibration(n=16, seqlen=64, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def bigger(family="llama", dtype=torch.float32):
    """Tiny family model with wider FFN and more heads, so heads and DGS groups both get exercised."""
    return tiny_model(family, attn_implementation="sdpa", dtype=dtype, hidden_size=128, num_attention_heads=8,
                      num_key_value_heads=8 if family == "llama" else 4, intermediate_size=384, head_dim=16)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_hessian_is_fp32_accurate(dtype):
    """bf16/fp16 inputs with fp32 output: same as the fp32 GEMM on upcast inputs (error ~1e-7, vs fp64)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randn(4, 512, 1024, device="cuda", generator=g).mul_(3).to(dtype) for _ in range(5)]
    fast = HessianAccumulator(1024, "cuda")
    for b in batches:
        fast.add(b)
    x = torch.cat([b.reshape(-1, 1024) for b in batches]).double()
    ref = 2 * x.t() @ x / 20
    assert rel(fast.hessian, ref) < 1e-5
    assert fast.hessian.dtype == torch.float32
    torch.testing.assert_close(fast.mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
    # the fp32 path (upcast first, TF32 off) lands at the same accuracy
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        slow = HessianAccumulator(1024, "cuda")
        for b in batches:
            slow.add(b.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert rel(slow.hessian, ref) < 1e-5


def _decisions(report):
    return [(r.kept_units, r.kept_channels) for r in report.layers]


@pytest.mark.parametrize("family", ["llama", "llama_gqa"])
def test_gpu_fp32_pruning_matches_cpu(family):
    cpu, gpu = bigger(family), bigger(family)
    a = slimflow.prune(cpu, calibration(), 0.3, device="cpu", progress=False)
    b = slimflow.prune(gpu, calibration(), 0.3, device="cuda", progress=False)
    assert _decisions(a) == _decisions(b)
    for ra, rb in zip(a.layers, b.layers):
        assert rb.attn_error == pytest.approx(ra.attn_error, rel=1e-3, abs=1e-6)
        assert rb.ffn_error == pytest.approx(ra.ffn_error, rel=1e-3, abs=1e-6)
    for pa, pb in zip(cpu.parameters(), gpu.parameters()):
        assert rel(pb, pa) < 1e-4


def test_gpu_bf16_pruning_close_to_cpu_fp32():
    """A bf16 model pruned on the GPU (bf16 activations, fp32 statistics) against the fp32 model on the CPU:
    bf16 activations move near-tied choices only, so the kept sets overlap almost fully and errors agree."""
    ref = bigger("llama")
    half = copy.deepcopy(ref).to(torch.bfloat16).cuda()
    ref = copy.deepcopy(half).float().cpu()  # identical (bf16-representable) weights in both
    a = slimflow.prune(ref, calibration(), 0.3, device="cpu", progress=False)
    b = slimflow.prune(half, calibration(), 0.3, device="cuda", progress=False)
    assert a.widths == b.widths
    same_heads = sum(ra.kept_units == rb.kept_units for ra, rb in zip(a.layers, b.layers))
    assert same_heads >= len(a.layers) - 1
    for ra, rb in zip(a.layers, b.layers):
        overlap = len(set(ra.kept_channels) & set(rb.kept_channels)) / len(ra.kept_channels)
        assert overlap > 0.9
        assert rb.ffn_error == pytest.approx(ra.ffn_error, rel=0.1)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_replay_equals_recomputation_on_gpu(dtype):
    a, b = bigger("llama_gqa", dtype).cuda(), bigger("llama_gqa", dtype).cuda()
    ra = slimflow.prune(a, calibration(), 0.3, device="cuda", progress=False)
    rb = slimflow.prune(b, calibration(), 0.3, replay_attention=False, device="cuda", progress=False)
    assert _decisions(ra) == _decisions(rb)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert rel(pa, pb) < tol


def test_cpu_model_pruned_on_gpu_stays_on_cpu_and_uses_one_layer_of_memory():
    model = bigger("llama", torch.bfloat16)
    slimflow.prune(model, calibration(), 0.3, device="cuda", progress=False)  # warm-up: library workspaces
    model = bigger("llama", torch.bfloat16)
    before = torch.cuda.memory_allocated()
    slimflow.prune(model, calibration(), 0.3, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.cuda.memory_allocated() - before < 1 << 20  # nothing left behind on the GPU


def test_pruned_equals_masked_in_bf16_on_gpu():
    """Physically pruned model == dense model with the removed units' o_proj / down_proj columns zeroed."""
    model = bigger("llama_gqa", torch.bfloat16).cuda()
    report = slimflow.prune(model, calibration(), 0.3, method="magnitude", device="cuda", progress=False)
    dense = bigger("llama_gqa", torch.bfloat16).cuda()
    with torch.no_grad():
        for layer, r in zip(dense.model.layers, report.layers):
            unit = 2 * 16  # g = 2 query heads of head_dim 16 per KV unit
            for u in range(4):
                if u not in r.kept_units:
                    layer.self_attn.o_proj.weight[:, u * unit : (u + 1) * unit] = 0
            drop = [c for c in range(384) if c not in set(r.kept_channels)]
            layer.mlp.down_proj.weight[:, drop] = 0
    ids = calibration(4, 48, seed=3).cuda()
    with torch.no_grad():
        pruned_logits = model(ids).logits.float()
        masked_logits = dense(ids).logits.float()
    assert rel(pruned_logits, masked_logits) < 1e-2
    assert (pruned_logits.argmax(-1) == masked_logits.argmax(-1)).float().mean() > 0.98


def test_gradient_pass_of_a_cpu_model_runs_on_the_gpu_and_matches_the_cpu():
    from slimflow.adapters import get_adapter
    from slimflow.allocation import residual_gradient_energy

    model = bigger("llama")
    ids = calibration(8, 64)
    on_cpu = residual_gradient_energy(model, get_adapter(model), ids, 4)
    torch.cuda.reset_peak_memory_stats()
    on_gpu = residual_gradient_energy(model, get_adapter(model), ids, 4, device="cuda")
    assert torch.cuda.max_memory_allocated() > sum(p.numel() * 4 for p in model.parameters())  # it ran there
    assert all(p.device.type == "cpu" for p in model.parameters())
    for (a, b), (c, d) in zip(on_cpu, on_gpu):
        assert c == pytest.approx(a, rel=1e-3) and d == pytest.approx(b, rel=1e-3)


def _mid_model():
    """A random model of about 0.4 GB in fp32: large enough that the device check and the hog below are not
    lost in the allocator's rounding."""
    return tiny_model("llama", hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8,
                      head_dim=128, num_hidden_layers=4, vocab_size=32000)


def test_a_gpu_with_too_little_free_memory_is_refused_before_any_work_and_enough_runs():
    from slimflow.device_memory import whole_model_need
    from slimflow.errors import InsufficientMemoryError

    model = _mid_model()
    before = [p.detach().clone() for p in model.parameters()]
    ids = calibration(16, 64)
    need = whole_model_need(model, torch.device("cuda", torch.cuda.current_device()), sampling_batch=64, seqlen=64)
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    hog = torch.empty(free - need["total"] + need["cache"] // 2, dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(InsufficientMemoryError, match="key/value cache of 64 sampled sequences"):
            slimflow.prune(model, ids, 0.2, schedule="adaptive", device="cuda", progress=False)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        del hog
        torch.cuda.empty_cache()
    # room for the weights and 2 GiB of work: without sampled sequences the adaptive prune of a CPU model runs
    hog = torch.empty(torch.cuda.mem_get_info()[0] - need["weights"] - (2 << 30), dtype=torch.uint8, device="cuda")
    try:
        report = slimflow.prune(model, ids, 0.2, schedule="adaptive", device="cuda", progress=False,
                                generated_samples=0)
    finally:
        del hog
        torch.cuda.empty_cache()
    assert abs(report.realised_fraction - 0.2) <= 0.005
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_real_out_of_memory_error_becomes_one_line():
    from slimflow.errors import out_of_memory_in

    free, total = torch.cuda.mem_get_info()
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(total + (1 << 30), dtype=torch.uint8, device="cuda")
    message = out_of_memory_in(caught.value)
    assert message.startswith("out of memory on the GPU (tried to allocate ") and " free)" in message
    assert "\n" not in message


def test_adaptive_prune_of_a_cpu_model_matches_the_same_model_on_the_gpu():
    on_cpu = bigger("llama")
    on_gpu = copy.deepcopy(on_cpu).cuda()
    kwargs = dict(schedule="adaptive", device="cuda", progress=False, generated_samples=0)
    a = slimflow.prune(on_cpu, calibration(16, 64), 0.3, **kwargs)
    b = slimflow.prune(on_gpu, calibration(16, 64), 0.3, **kwargs)
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    assert _decisions(a) == _decisions(b)
    search_a, search_b = (r.settings["allocation"]["search"] for r in (a, b))
    assert search_a["chosen"] == search_b["chosen"]
    for name, score in search_a["scores"].items():
        assert score == pytest.approx(search_b["scores"][name], rel=1e-4)
    for pa, pb in zip(on_cpu.parameters(), on_gpu.parameters()):
        assert rel(pa, pb.cpu()) < 1e-4
