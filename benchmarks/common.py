"""Shared helpers of the GPU benchmarks: LLaMA-2 shapes with random weights, timing, FLOP floors."""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # LLaMA-2 shapes (vocab 32000, MHA); "tiny" for CPU smoke runs of the scripts
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
    # decoder-heavy enough for a 20% ratio at vocab 32000: CPU rehearsals of the managed run
    "small": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16),
}


def config_for(shape: str) -> LlamaConfig:
    s = SHAPES[shape]
    return LlamaConfig(vocab_size=32000, max_position_embeddings=4096, num_key_value_heads=s["num_attention_heads"],
                       rms_norm_eps=1e-5, tie_word_embeddings=False, **s)


@torch.no_grad()
def build_model(shape: str, device: str = "cuda", home: str = "cpu", seed: int = 0,
                attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """Random bf16 model of `shape`, initialised on `device` (fast on a GPU) and then moved to `home`.

    Linear and embedding weights are N(0, 0.02) (HF's init, run on the GPU); norms are ones."""
    torch.manual_seed(seed)
    config = config_for(shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation,
                                                  dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(home).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0


def device_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers, peft, lightning  # noqa: E401

        info |= {"transformers": transformers.__version__, "peft": peft.__version__, "lightning": lightning.__version__}
    except ImportError as e:  # pragma: no cover
        info["import_error"] = str(e)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "sms": p.multi_processor_count, "gpu_mem_gib": gib(p.total_memory)}
    info["cpus"] = os.cpu_count()
    return info


def gemm_rate(n: int = 8192, dtype=torch.bfloat16, reps: int = 10) -> float:
    """Measured TFLOP/s of an n³ matrix product on random data (median of `reps` after warm-up)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def copy_rate(nbytes: int = 4 << 30) -> float:
    """Measured device-to-device copy TB/s (bytes read + written)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync()
    return 2 * nbytes * 5 / (time.perf_counter() - t) / 1e12


def pruning_floor(shape: str, tokens: int, seqlen: int, ratio: float, bf16_tflops: float, fp32_tflops: float) -> dict:
    """FLOP counts of SlimGPT pruning over `tokens` calibration tokens and their time at measured rates.

    forward_3pass: what the textbook three passes per layer do (to o_proj, to down_proj, full pruned layer);
    forward_min: one dense pass per layer (the statistics need at least that); hessian: the two X Xᵀ products
    (full GEMMs; a symmetric rank-k update would halve them); factor: Cholesky + inverse of both Hessians
    (≈ n³ each) in fp32."""
    c = config_for(shape)
    d, m, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    attn_core = 2 * 2 * seqlen * d * tokens / 2  # QKᵀ and PV, causal half
    qkv, o, mlp_in, down = 3 * d * d, d * d, 2 * d * m, d * m
    keep = 1 - ratio
    dense_layer = 2 * tokens * (qkv + o + mlp_in + down) + attn_core
    pass1 = 2 * tokens * qkv + attn_core
    pass2 = pass1 + 2 * tokens * (o * keep + mlp_in)
    pass3 = dense_layer * keep
    hessian = 2 * tokens * (d * d + m * m)
    factor = (d**3 + m**3) * 4 / 3  # cholesky n³/3 + cholesky_inverse ≈ n³
    out = {
        "forward_3pass_flop": L * (pass1 + pass2 + pass3),
        "forward_min_flop": L * dense_layer,
        "hessian_flop": L * hessian,
        "factor_flop": L * factor,
    }
    out["floor_s"] = (out["forward_min_flop"] + out["hessian_flop"]) / (bf16_tflops * 1e12) + out["factor_flop"] / (
        fp32_tflops * 1e12)
    out["floor_3pass_s"] = out["floor_s"] + (out["forward_3pass_flop"] - out["forward_min_flop"]) / (bf16_tflops * 1e12)
    return out


def write(path: str | None, data: dict) -> None:
    text = json.dumps(data, indent=1, default=str)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print(text[-3000:])
