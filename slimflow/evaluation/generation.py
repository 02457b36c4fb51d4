"""Generation samples: fixed prompts answered greedily, to eyeball what pruning and fine-tuning did."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The most important thing to remember when learning a new language is",
    "She opened the letter and read the first line:",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName three primary colours.\n\n### Response:\n",
)


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
                     max_new_tokens: int = 48, device=None) -> list[dict]:
    """Greedy continuation of each prompt, one prompt at a time (no padding). Returns `[{prompt, completion}]`."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    try:
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            output = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            new_tokens = output[0, encoded["input_ids"].shape[1] :]
            samples.append(
                {
                    "prompt": prompt,
                    "completion": tokenizer.decode(new_tokens, skip_special_tokens=True),
                    "new_tokens": int(new_tokens.numel()),
                }
            )
    finally:
        model.train(was_training)
    return samples


def samples_markdown(samples: list[dict], title: str = "Generation samples") -> str:
    lines = [f"# {title}", "", "Greedy decoding, fixed prompts.", ""]
    for i, sample in enumerate(samples, 1):
        lines += [f"## Sample {i}", "", "**Prompt**", "", "```text", sample["prompt"], "```", "",
                  "**Completion**", "", "```text", sample["completion"], "```", ""]
    return "\n".join(lines)


def save_samples(samples: list[dict], path: str | os.PathLike, title: str = "Generation samples",
                 metadata: dict | None = None) -> tuple[Path, Path]:
    """Write `path` (`.json`, with `metadata`) and the same name with `.md`; returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps({"metadata": metadata or {}, "samples": samples}, indent=2, ensure_ascii=False))
    md_path = path.with_suffix(".md")
    md_path.write_text(samples_markdown(samples, title))
    return json_path, md_path
