"""Pretrain the small reference models that quality work runs on besides `ref-llama-27m`.

Two shapes, both under 12 M parameters (bf16 weights under 24 MB) with tied embeddings, trained on
`../shared/pretrain_corpus` parts 000-006 with the shared 8,192-token tokenizer of `ref-llama-27m`; part-007 stays
held out (evaluation and calibration text only):

- `ref-llama-gqa-12m`: `LlamaForCausalLM`, 8 layers, 12 query heads / 4 KV heads (GQA groups of 3), head_dim 32.
- `ref-qwen2-12m`: `Qwen2ForCausalLM` (q/k/v biases), 9 layers, 12 query heads / 6 KV heads, head_dim 32.

Reproducible: the seed fixes the initialisation and the data order, and the learning-rate schedule depends only on
the number of steps. With `--minutes` the step count is chosen once, during warm-up (before the schedule depends on
it), from the measured step time, and written to the log; `--steps N` reruns exactly that schedule.

    python -m benchmarks.pretrain_reference tokenize --out runs/tokens
    python -m benchmarks.pretrain_reference train --preset ref-llama-gqa-12m --tokens runs/tokens --minutes 3 --out runs/m
    python -m benchmarks.pretrain_reference evaluate --model runs/m/ref-llama-gqa-12m

`tokenize` writes the token stream once (uint16), so models trained side by side share it. Each document of the
corpus (`text.split("<|endoftext|>\\n")`) is encoded as `<s> text </s>`; the stream is cut into windows of
`seqlen` tokens, reshuffled every epoch at a random offset.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PRESETS = {
    "ref-llama-gqa-12m": dict(
        architecture="LlamaForCausalLM", hidden_size=384, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=4, head_dim=32, intermediate_size=576,
    ),
    "ref-qwen2-12m": dict(
        architecture="Qwen2ForCausalLM", hidden_size=384, num_hidden_layers=9, num_attention_heads=12,
        num_key_value_heads=6, head_dim=32, intermediate_size=448,
    ),
    # CPU rehearsal of the script only
    "tiny-llama": dict(
        architecture="LlamaForCausalLM", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128,
    ),
    "tiny-qwen2": dict(
        architecture="Qwen2ForCausalLM", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128,
    ),
}
CORPUS = "../shared/pretrain_corpus"
TOKENIZER = "../shared/models/ref-llama-27m"
HELDOUT = "../shared/pretrain_corpus/part-007.txt.gz"
TRAIN_PARTS = tuple(f"part-00{i}.txt.gz" for i in range(7))
DOC_END = "<|endoftext|>\n"


def build_model(preset: str, seed: int):
    """A freshly initialised model of `preset` (HF init under `seed`), fp32, with the tokenizer's special ids."""
    import transformers

    spec = dict(PRESETS[preset])
    arch = spec.pop("architecture")
    config_cls = transformers.LlamaConfig if arch == "LlamaForCausalLM" else transformers.Qwen2Config
    config = config_cls(
        vocab_size=8192, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu", initializer_range=0.02,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, **spec,
    )
    if arch == "LlamaForCausalLM":
        config.attention_bias = False
        config.mlp_bias = False
    torch.manual_seed(seed)
    return getattr(transformers, arch)(config)


def tokenize(out: str = "runs/tokens", corpus: str = CORPUS, tokenizer: str = TOKENIZER, max_docs: int | None = None) -> dict:
    """Encode parts 000-006 of `corpus` as one uint16 stream `<out>/train.npy` (`<s> doc </s>` per document).

    Args:
        out: directory for `train.npy` and `tokens.json`.
        corpus: directory holding `part-000.txt.gz` ... `part-006.txt.gz` (part-007 is never read).
        tokenizer: directory of the shared tokenizer.
        max_docs: keep only the first documents (CPU rehearsal of the script).
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    docs = []
    for part in TRAIN_PARTS:
        with gzip.open(Path(corpus) / part, "rt", encoding="utf-8") as f:
            docs += [d for d in f.read().split(DOC_END) if d.strip()]
    docs = docs[:max_docs]
    encoded = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)  # parallel over documents
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stream = np.concatenate([np.asarray([bos] + e.ids + [eos], dtype=np.uint16) for e in encoded])
    Path(out).mkdir(parents=True, exist_ok=True)
    np.save(Path(out) / "train.npy", stream)
    info = {"documents": len(docs), "characters": sum(map(len, docs)), "tokens": int(stream.size),
            "parts": list(TRAIN_PARTS), "seconds": round(time.perf_counter() - started, 1)}
    (Path(out) / "tokens.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info), flush=True)
    return info


def save_tokenizer(tokenizer: str, save_dir: Path) -> None:
    """Copy the shared tokenizer next to a model, with an explicit "no pad token".

    Without that entry transformers loads a Qwen2 model's tokenizer as `Qwen2Tokenizer`, whose default pad token
    `<|endoftext|>` becomes an added token 8192, outside the 8192-row embedding, and the corpus' document
    separators would encode to it.
    """
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(save_dir)
    config_path = Path(save_dir) / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"pad_token": None}, indent=2))


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `lr` to `min_ratio * lr` at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Windows:
    """Epochs of shuffled `seqlen` windows of the token stream, each epoch at a fresh random offset."""

    def __init__(self, stream: torch.Tensor, seqlen: int, batch: int, seed: int):
        self.stream, self.seqlen, self.batch = stream, seqlen, batch
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.order, self.pos, self.offset, self.epoch = None, 0, 0, -1

    def next(self) -> torch.Tensor:
        if self.order is None or self.pos + self.batch > len(self.order):
            self.epoch += 1
            self.offset = int(torch.randint(self.seqlen, (1,), generator=self.gen)) if self.epoch else 0
            count = (len(self.stream) - self.offset) // self.seqlen
            self.order, self.pos = torch.randperm(count, generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        starts = (self.offset + idx * self.seqlen).to(self.stream.device)
        return self.stream[starts[:, None] + torch.arange(self.seqlen, device=self.stream.device)]


def train(
    preset: str,
    out: str,
    tokens: str = "runs/tokens",
    seed: int = 0,
    seqlen: int = 512,
    batch: int = 64,
    lr: float = 2e-3,
    min_lr_ratio: float = 0.1,
    warmup: int = 200,
    weight_decay: float = 0.1,
    steps: int | None = None,
    minutes: float | None = None,
    measure_from: int = 20,
    measure_steps: int = 40,
    log_every: int = 200,
    hard_limit_factor: float = 1.15,
    device: str = "cuda",
    tokenizer: str = TOKENIZER,
) -> dict:
    """Pretrain one preset; save it in bf16 (HF directory with the tokenizer) under `<out>/<preset>`.

    Args:
        preset: one of PRESETS.
        out: parent directory of the saved model.
        tokens: directory written by `tokenize`.
        seed: initialisation and data-order seed.
        seqlen: training window in tokens.
        batch: windows per optimizer step.
        lr: peak AdamW learning rate (betas 0.9/0.95, gradient norm clipped to 1).
        min_lr_ratio: final learning rate as a fraction of `lr` (cosine decay).
        warmup: linear warm-up steps.
        weight_decay: AdamW decoupled weight decay on matrices (not on norms and biases).
        steps: exact number of optimizer steps (reproduces a logged run).
        minutes: wall-clock budget; the step count is fixed from the step time measured during warm-up.
        measure_from: first step of the timing window used with `minutes`.
        measure_steps: length of that timing window (must end before `warmup`).
        log_every: steps between loss log lines.
        hard_limit_factor: stop early (and say so in the log) if training runs past this multiple of `minutes`.
        device: `cuda` (bf16 autocast) or `cpu` (fp32, rehearsal only).
        tokenizer: directory whose tokenizer files are copied next to the model.
    """
    import transformers
    from transformers import AutoTokenizer

    if (steps is None) == (minutes is None):
        raise SystemExit("give exactly one of --steps (exact rerun) or --minutes (budget)")
    if minutes is not None and measure_from + measure_steps >= warmup:
        raise SystemExit("--measure_from + --measure_steps must end before --warmup so the schedule is fixed in time")
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    stream = torch.from_numpy(np.load(Path(tokens) / "train.npy").astype(np.int64)).to(dev)
    model = build_model(preset, seed).to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    data = Windows(stream, seqlen, batch, seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    log, planned, step, stopped_early = [], steps, 0, False
    started = time.perf_counter()
    t_measure = None
    while planned is None or step < planned:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, planned or 10**9, lr, warmup, min_lr_ratio)
        ids = data.next()
        with autocast:
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if planned is None and step == measure_from:
            sync()
            t_measure = time.perf_counter()
        if planned is None and step == measure_from + measure_steps:
            sync()
            per_step = (time.perf_counter() - t_measure) / measure_steps
            remaining = minutes * 60 - (time.perf_counter() - started)
            planned = step + max(1, int(remaining / per_step))
            print(f"{preset}: {per_step * 1e3:.1f} ms/step -> {planned} steps", flush=True)
        if step % log_every == 0 or step == planned:
            entry = {"step": step, "loss": round(loss.item(), 4), "lr": group["lr"], "tokens": step * batch * seqlen,
                     "epoch": data.epoch, "sec": round(time.perf_counter() - started, 1)}
            log.append(entry)
            print(preset, entry, flush=True)
        if minutes is not None and time.perf_counter() - started > minutes * 60 * hard_limit_factor:
            stopped_early = True
            break
    sync()
    train_seconds = time.perf_counter() - started
    save_dir = Path(out) / preset
    model.to(torch.bfloat16).save_pretrained(save_dir)
    save_tokenizer(tokenizer, save_dir)
    result = {
        "preset": preset, "architecture": PRESETS[preset]["architecture"], "params": params, "steps": step,
        "planned_steps": planned, "stopped_early": stopped_early, "train_tokens": step * batch * seqlen,
        "corpus_tokens": int(stream.numel()), "epochs": round(step * batch * seqlen / stream.numel(), 2),
        "train_seconds": round(train_seconds, 1), "final_loss": log[-1]["loss"] if log else loss.item(),
        "settings": {"seed": seed, "seqlen": seqlen, "batch": batch, "lr": lr, "min_lr_ratio": min_lr_ratio,
                     "warmup": warmup, "weight_decay": weight_decay, "betas": [0.9, 0.95], "grad_clip": 1.0,
                     "precision": "bf16 autocast, fp32 master weights" if dev.type == "cuda" else "fp32",
                     "rerun": f"--steps {step}"},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(),
                        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"},
        "log": log,
    }
    (save_dir / "train_log.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
    return result


def evaluate(model: str, heldout: str = HELDOUT, windows: list[int] = [128, 512], max_tokens: int = 400_000,
             wikitext: bool = True, data_dir: str | None = None, device: str = "cuda", batch_size: int = 32) -> dict:
    """Dense perplexity (slimflow's protocol, fp32 compute on the bf16 weights) of a saved model; adds it to its log.

    Args:
        model: saved model directory.
        heldout: held-out book text (its first `max_tokens` tokens are scored).
        windows: window lengths of the held-out measurement.
        max_tokens: tokens of the held-out text cut into windows.
        wikitext: also score WikiText-2 test at window 128 (out of domain).
        data_dir: slimflow data directory for WikiText-2 (default: ../shared/data).
        device: where to compute.
        batch_size: windows per forward pass.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimflow.evaluation.perplexity import evaluate_perplexity

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model)
    specs = [f"{heldout}:{w}:{max_tokens}" for w in windows] + (["wikitext2:128"] if wikitext else [])
    cache: dict = {}
    results = {}
    for spec in specs:
        r = evaluate_perplexity(net, tok, spec, batch_size=batch_size, data_dir=data_dir, progress=False,
                                texts_cache=cache)
        key = f"ppl_{'heldout' if r.dataset == Path(heldout).name else r.dataset}_{r.window}"
        results[key] = round(r.value, 3)
        results[key + "_windows"] = r.num_windows
    log_path = Path(model) / "train_log.json"
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        log["perplexity"] = results | {"device": str(device), "compute": "fp32 on bf16 weights"}
        log_path.write_text(json.dumps(log, indent=1))
    print(json.dumps({"model": Path(model).name} | results), flush=True)
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    CLI([tokenize, train, evaluate], as_positional=False)
