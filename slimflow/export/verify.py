"""Check an exported GGUF file in llama.cpp itself (through `llama-cpp-python`) against the slimflow model.

`compare_with_llama_cpp` runs the same prompt through both: the logits of every prompt position, and a greedy
continuation in which each runtime feeds back its own argmax. llama.cpp runs with an f32 KV cache so that an
f32 export is compared without the cache's f16 rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Equivalence:
    max_abs_logit_diff: float  # over every prompt position and vocabulary entry
    logit_scale: float  # max |logit| of the slimflow model, for scale
    prompt_tokens: int
    new_tokens: int
    tokens_matched: int  # leading greedy tokens identical in both runtimes
    slimflow_tokens: list[int]
    llama_cpp_tokens: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def load_llama_cpp(path, n_ctx: int = 512, n_threads: int | None = None, f32_cache: bool = True):
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

    cache = GGML_TYPE_F32 if f32_cache else GGML_TYPE_F16
    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads or torch.get_num_threads(),
                 logits_all=True, verbose=False, type_k=cache, type_v=cache)


def llama_cpp_greedy(llm, ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """(logits of every prompt position, greedy continuation) computed by llama.cpp."""
    llm.reset()
    llm.eval(list(ids))
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return logits, out


@torch.no_grad()
def slimflow_greedy(model, ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """(logits of every prompt position, greedy continuation) of the Hugging Face / slimflow model."""
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device), use_cache=True)
    logits = out.logits[0].float().cpu().numpy()
    past, last, tokens = out.past_key_values, out.logits[0, -1], []
    for _ in range(new_tokens):
        token = int(torch.argmax(last))
        tokens.append(token)
        out = model(torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
        past, last = out.past_key_values, out.logits[0, -1]
    return logits, tokens


def compare_with_llama_cpp(model, gguf_path, ids: list[int], new_tokens: int = 32, llm=None) -> Equivalence:
    llm = llm or load_llama_cpp(gguf_path, n_ctx=len(ids) + new_tokens + 8)
    ref_logits, ref_tokens = slimflow_greedy(model, ids, new_tokens)
    cpp_logits, cpp_tokens = llama_cpp_greedy(llm, ids, new_tokens)
    matched = 0
    for a, b in zip(ref_tokens, cpp_tokens):
        if a != b:
            break
        matched += 1
    return Equivalence(
        max_abs_logit_diff=float(np.abs(ref_logits - cpp_logits).max()),
        logit_scale=float(np.abs(ref_logits).max()),
        prompt_tokens=len(ids), new_tokens=new_tokens, tokens_matched=matched,
        slimflow_tokens=ref_tokens, llama_cpp_tokens=cpp_tokens,
    )
