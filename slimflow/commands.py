"""Function commands of the `slimflow` CLI. Signatures and docstrings are the command-line schema."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml


def prune(
    *,
    model: str,
    calibration: str,
    output: str,
    ratio: float = 0.2,
    schedule: str = "log_increase",
    method: str = "slimgpt",
    num_samples: int = 128,
    seqlen: int = 2048,
    sampling: str = "random",
    skip_tokens: int = 0,
    seed: int = 0,
    damp: float = 0.01,
    method_kwargs: dict | None = None,
    spread: float = 4.0,
    max_layer_ratio: float | None = None,
    channel_multiple: int = 1,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    save_dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prune a causal LM with layer-wise structured pruning and save a reloadable checkpoint.

    Args:
        model: local model directory or hub id (e.g. meta-llama/Llama-2-7b-hf).
        calibration: local .txt/.json/.jsonl (optionally .gz) file, or a hub dataset name (e.g. c4, wikitext2).
        output: directory to write the pruned checkpoint to (must not exist unless --overwrite).
        ratio: fraction of the model's total parameters to remove, in (0, 1).
        schedule: per-layer ratios: uniform, linear or log_increase.
        method: pruning method (slimgpt, magnitude, ...).
        num_samples: number of calibration sequences.
        seqlen: tokens per calibration sequence.
        sampling: random (seeded windows) or tail (consecutive windows from the end of the text).
        skip_tokens: ignore this many leading tokens of the calibration text (random sampling).
        seed: seed of the calibration sampling; pruning is deterministic for a given seed.
        damp: Hessian damping λ (SlimGPT).
        method_kwargs: further method options as a mapping, e.g. '{"exact_head_score": false}' for SlimGPT.
        spread: r_max / r_min of the linear and log_increase schedules.
        max_layer_ratio: optional cap on any single layer's ratio.
        channel_multiple: keep each FFN width a multiple of this.
        batch_size: calibration sequences per forward pass.
        device: where layers are processed: auto (CUDA if present), cpu, cuda, cuda:1, ...
        dtype: dtype used while pruning: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.
        save_dtype: dtype of the saved weights: auto (the source checkpoint's dtype), float32, bfloat16, float16.
        overwrite: replace an existing output directory.
        progress: show progress bars.
    """
    arguments = dict(locals())
    import torch

    from slimflow.api import plan
    from slimflow.api import prune as run_prune
    from slimflow.checkpoint import save_pruned
    from slimflow.data.calibration import calibration_ids
    from slimflow.methods import get_method
    from slimflow.models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from slimflow.reporting import plot_widths

    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --output or pass --overwrite")
    if not 0 < ratio < 1:
        raise ValueError(f"--ratio must be in (0, 1) (the fraction of parameters to remove), got {ratio}")
    method_kwargs = ({"damp": damp} if method == "slimgpt" else {}) | dict(method_kwargs or {})
    get_method(method, **method_kwargs)  # unknown method: fail before loading anything
    start = time.perf_counter()
    dev = resolve_device(device)
    net = load_model(model, dtype=resolve_dtype(dtype, dev), device="cpu")
    source_dtype = getattr(net.config, "dtype", None) or torch.float32
    tokenizer = load_tokenizer(model)
    plan(net, ratio, schedule, spread=spread, max_layer_ratio=max_layer_ratio, channel_multiple=channel_multiple)
    max_pos = getattr(net.config, "max_position_embeddings", None)
    if max_pos and seqlen > max_pos:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions: use --seqlen {max_pos} or less")
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    ids = calibration_ids(calibration, tokenizer, num_samples, seqlen, seed, sampling, skip_tokens)
    if dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory > 2 * sum(
            p.numel() * p.element_size() for p in net.parameters()):
        net.to(dev)
    report = run_prune(net, ids, ratio, schedule, method, spread=spread, max_layer_ratio=max_layer_ratio,
                       channel_multiple=channel_multiple, batch_size=batch_size, device=dev, progress=progress,
                       method_kwargs=method_kwargs)
    target_dtype = source_dtype if save_dtype == "auto" else resolve_dtype(save_dtype, dev)
    if isinstance(target_dtype, str):
        target_dtype = resolve_dtype(target_dtype, dev)
    net.to(device="cpu", dtype=target_dtype)
    info = report.to_dict()
    info["calibration"] = {"source": calibration, "sampling": sampling, "seed": seed, "skip_tokens": skip_tokens}
    info["source_model"] = model
    info["total_wall_time_s"] = round(time.perf_counter() - start, 3)
    save_pruned(net, out, tokenizer=tokenizer, report=info, overwrite=overwrite)
    (out / "pruning_report.md").write_text(report.to_markdown())
    plot_widths(info, out / "widths.png")
    (out / "slimflow_prune.yaml").write_text(yaml.safe_dump({"prune": arguments}, sort_keys=False))
    print(report.to_markdown())
    print(f"saved pruned model to {out} ({info['total_wall_time_s']:.1f} s)")
    return {"output": str(out), "params_before": report.params_before, "params_after": report.params_after}


def compare(*args, **kwargs):
    """Prune one model with several methods and compare them (see docs/methods.md)."""
    raise SystemExit("slimflow compare: not available yet")
