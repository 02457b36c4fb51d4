"""llama.cpp speed of pruned models: GGUF files written by slimflow, run through llama-cpp-python on the CPU.

For each ratio the model is shrunk to the per-layer widths `slimflow prune` plans (log_increase schedule,
`--channel-multiple`), exported with `slimflow.export.write_gguf` and measured in llama.cpp: prompt processing
(one `--prompt`-token batch) and decode (`--new-tokens` single-token steps after it), each the median of
`--reps` runs after a warm-up. Speed depends only on the shapes, so a `--shape` model gets random weights and
the leading units of each layer (`--model` prunes the same way from a real checkpoint's weights).

    python -m benchmarks.llamacpp_speed --shape 7b --ratios 0 0.5 0.2 --dtype f16 --threads 16 --out r.json
    python -m benchmarks.llamacpp_speed --model ../shared/models/ref-llama-27m --ratios 0 0.2 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slimflow.api import plan
from slimflow.surgery import LayerWidths, apply_widths, count_parameters, layer_widths


def pruned_widths(model, ratio: float, channel_multiple: int) -> list[LayerWidths]:
    """The widths slimflow prune plans for `ratio` (kept KV units x group size, kept FFN channels)."""
    dense = layer_widths(model)
    if not ratio:
        return dense
    layers = plan(model, ratio, "log_increase", channel_multiple=channel_multiple).layers
    out = []
    for w, p in zip(dense, layers):
        kv = w.num_key_value_heads - p.remove_units
        out.append(LayerWidths(kv * (w.num_attention_heads // w.num_key_value_heads), kv,
                               w.intermediate_size - p.remove_channels))
    return out


@torch.no_grad()
def random_model(shape: str, widths_for, dtype=torch.float16):
    """A LLaMA-2 `shape` at the widths `widths_for(model)` returns, built on meta and filled cheaply.

    Weights repeat one random N(0, 0.02) block (norms are ones): the matmuls cost the same as for any values."""
    from benchmarks.common import config_for
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config_for(shape)).to(dtype)
    apply_widths(model, widths_for(model))
    model.to_empty(device="cpu")
    block = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    for name, param in model.named_parameters():
        flat = param.data.view(-1)
        if "norm" in name:
            flat.fill_(1.0)
            continue
        for start in range(0, flat.numel(), block.numel()):
            n = min(block.numel(), flat.numel() - start)
            flat[start:start + n].copy_(block[:n])
    return model.eval()


def reference_model(path: str, widths_for):
    from slimflow.models import load_model

    model = load_model(path, dtype="float32", device="cpu")
    apply_widths(model, widths_for(model))
    return model


def measure(gguf_path: Path, threads: int, prompt: int, new_tokens: int, reps: int, vocab: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), n_ctx=prompt + new_tokens + 16, n_batch=prompt, n_ubatch=prompt,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = np.random.default_rng(0).integers(3, min(vocab, 8000), prompt).tolist()

    def run(decode_steps: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(decode_steps):  # which token is fed back does not change the cost of a step
            llm.eval([ids[step % len(ids)]])
        return prompt_s, time.perf_counter() - start

    run(4)  # warm-up: pages the weights in, builds the compute graphs
    runs = [run(new_tokens) for _ in range(reps)]
    pp = [prompt / p for p, _ in runs]
    tg = [new_tokens / d for _, d in runs]
    del llm
    return {"prompt_tokens_per_s": round(statistics.median(pp), 2), "decode_tokens_per_s": round(statistics.median(tg), 2),
            "prompt_runs": [round(x, 2) for x in pp], "decode_runs": [round(x, 2) for x in tg]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape", help="LLaMA-2 shape with random weights: 7b, 13b or tiny")
    source.add_argument("--model", help="a dense checkpoint directory (its weights, pruned to the planned widths)")
    parser.add_argument("--tokenizer", help="tokenizer directory for --shape (default: the reference model's)",
                        default="../shared/models/ref-llama-27m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    parser.add_argument("--channel-multiple", type=int, default=64)
    parser.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the GGUF files go (deleted after each measurement)")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every model")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    import llama_cpp
    from slimflow.export.gguf import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(args.model or args.tokenizer)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llamacpp_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "llama_cpp_python": llama_cpp.__version__, "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "rows": []}
    for ratio in args.ratios:
        started = time.perf_counter()
        widths_for = lambda m, r=ratio: pruned_widths(m, r, args.channel_multiple)  # noqa: E731
        model = random_model(args.shape, widths_for) if args.shape else reference_model(args.model, widths_for)
        params = count_parameters(model)
        path = workdir / f"ratio{ratio}.gguf"
        summary = write_gguf(model, tokenizer, path, dtype=args.dtype, overwrite=True, name=f"ratio {ratio}")
        widths = [w.to_dict() for w in layer_widths(model)]
        vocab = model.config.vocab_size
        del model
        built_s = time.perf_counter() - started
        row = {"ratio": ratio, "parameters": params, "file_bytes": summary["bytes"], "build_and_export_s": round(built_s, 1),
               "f16_fallback_tensors": len(summary["f16_fallback"]),
               **measure(path, args.threads, args.prompt, args.new_tokens, args.reps, vocab), "layer_widths": widths}
        path.unlink()
        result["rows"].append(row)
        dense = result["rows"][0]
        for r in result["rows"]:
            r["decode_speedup"] = round(r["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3)
            r["prompt_speedup"] = round(r["prompt_tokens_per_s"] / dense["prompt_tokens_per_s"], 3)
        print(json.dumps({k: v for k, v in row.items() if k != "layer_widths"}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
