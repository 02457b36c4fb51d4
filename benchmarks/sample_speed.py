"""Time `slimflow.data.generated.sample_sequences` on a randomly initialised model of a given shape (bf16, GPU):
the cost of `generated_samples` at 7B size, where no checkpoint is at hand.

    python -m benchmarks.sample_speed llama-7b 64 512    # shape, batch, seqlen
"""

from __future__ import annotations

import json
import time

import torch

SHAPES = {"llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)}


def main(shape: str = "llama-7b", batch: int = 64, seqlen: int = 512) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimflow.data.generated import sample_sequences

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    sample_sequences(model, batch, 8, batch_size=batch)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    sample_sequences(model, batch, seqlen, batch_size=batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    result = {"shape": shape, "batch": batch, "seqlen": seqlen, "seconds": round(seconds, 2),
              "ms_per_step": round(1000 * seconds / (seqlen - 1), 2), "device": torch.cuda.get_device_name(),
              "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    import sys

    main(*[int(a) if a.isdigit() else a for a in sys.argv[1:]])
