"""Tiny random causal LMs built from configs (no hub access), shared by the test suite.

Every family has hidden 64, head_dim 16, 4 query heads, 3 layers, FFN 96 and vocab 128, so one test runs in
milliseconds. Weights use a wider init than the HF default so that logits and greedy tokens are not near ties.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

FAMILIES = ("llama", "llama_gqa", "mistral", "qwen2", "gemma2", "phi3")

VOCAB = 128
PAD_ID = 0

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=None,
)


def tiny_config(family: str = "llama", **overrides):
    """The config of `tiny_model(family)`; `overrides` replace any field (e.g. `tie_word_embeddings=True`)."""
    if family == "llama":
        config = LlamaConfig(**{**_COMMON, "num_key_value_heads": 4, **overrides})
    elif family == "llama_gqa":
        config = LlamaConfig(**{**_COMMON, "num_key_value_heads": 2, **overrides})
    elif family == "mistral":
        config = MistralConfig(**{**_COMMON, "num_key_value_heads": 2, "sliding_window": 8, **overrides})
    elif family == "qwen2":
        # Qwen2 has q/k/v biases and, like its small checkpoints, tied embeddings.
        config = Qwen2Config(**{**_COMMON, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides})
    elif family == "gemma2":
        # alternating sliding / full layers (window shorter than the test sequences), soft-capping, tied embeddings
        config = Gemma2Config(**{**_COMMON, "num_key_value_heads": 2, "sliding_window": 6, "query_pre_attn_scalar": 16,
                                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                 **overrides})
    elif family == "phi3":
        # fused qkv_proj and gate_up_proj
        config = Phi3Config(**{**_COMMON, "num_key_value_heads": 2, "pad_token_id": PAD_ID, **overrides})
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    return config


def tiny_model(
    family: str = "llama",
    attn_implementation: str = "eager",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A random model of `family` in eval mode (fp32 unless `dtype` says otherwise; rotary buffers stay fp32)."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    if family == "qwen2":
        # HF initialises biases to zero; random ones make sure slicing keeps each bias with its row.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    return model.eval()


def padded_batch(seed: int = 0, lengths: tuple[int, ...] = (12, 7, 9)) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` for sequences of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary: `"w5 w7"` encodes to `[5, 7]`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
