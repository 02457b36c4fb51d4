"""The managed run at full size: `slimflow fit` on a LLaMA-2-7B-shaped checkpoint with random bf16 weights, the
plain PyTorch + PEFT loop on the same batches for the throughput ratio, and streaming pruning of a 13B shape.

    python -m benchmarks.fit_7b write --shape 7b --out WORK/dense          # random weights + tokenizer
    python -m benchmarks.fit_probe OUT/fit.json slimflow fit --config benchmarks/fit_7b.yaml \\
        --model.init_args.pretrained WORK/dense --trainer.default_root_dir WORK/run
    python -m benchmarks.fit_7b plain --model WORK/run/export/model --micro-batches 128 --out OUT/plain.json
    python -m benchmarks.fit_probe OUT/stream.json slimflow prune --model WORK/dense_stream --streaming true ...

benchmarks/fit_7b.sh runs all of it on the GPU machine. The checkpoint keeps LLaMA-2's vocabulary of 32000
(the shared 8192-token tokenizer only ever emits the first 8192 ids), so parameter counts are LLaMA-2's.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import build_model, device_info, write
from benchmarks.fit_probe import gpu_peak_gib, host_peak_gib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_checkpoint(args) -> None:
    """Random bf16 weights of `shape` (initialised on the GPU), saved with the tokenizer of `tokenizer`."""
    start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.shape, device=dev, home=dev)
    built = time.perf_counter() - start
    model.save_pretrained(args.out, max_shard_size="5GB")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(args.tokenizer) / name, Path(args.out) / name)
    params = sum(p.numel() for p in model.parameters())
    del model
    write(args.json, {"shape": args.shape, "params": params, "build_s": round(built, 2),
                      "save_s": round(time.perf_counter() - start - built, 2),
                      "bytes": sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))})


def plain_loop(args) -> None:
    """Plain PyTorch + PEFT LoRA training (the loop of benchmarks/finetune_gpu.py with gradient accumulation) on
    the pruned model, with the Alpaca micro-batches `slimflow fit` trained on, in the same order."""
    from peft import get_peft_model
    from torch.optim.lr_scheduler import LambdaLR

    from slimflow.checkpoint import load_pruned
    from slimflow.lightning.data import InstructionData
    from slimflow.lightning.lora import LoRARecovery
    from slimflow.lightning.module import warmup_cosine

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pruned(args.model, dtype=torch.bfloat16, device=dev)
    data = InstructionData(args.data, tokenizer=args.model, cutoff_len=256, val_size=0, batch_size=4)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    lora = LoRARecovery(r=8, alpha=16, dropout=0.05,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora.lora_config())
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = LambdaLR(opt, warmup_cosine(2, args.micro_batches // args.accumulate))
    tokens = nonpad = 0
    t0 = None
    args.warmup = min(args.warmup, args.micro_batches // 2)
    for i, batch in enumerate(loader):
        if i == args.micro_batches:
            break
        if i == args.warmup:
            torch.cuda.synchronize() if dev == "cuda" else None
            t0 = time.perf_counter()
        if t0 is not None:
            tokens += batch["input_ids"].numel()
            nonpad += int(batch["attention_mask"].sum())
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = peft_model(**batch, use_cache=False).loss / args.accumulate
        loss.backward()
        if (i + 1) % args.accumulate == 0:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if dev == "cuda" else None
    seconds = time.perf_counter() - t0
    write(args.json, {"device": device_info(), "micro_batches": args.micro_batches, "warmup": args.warmup,
                      "tokens": tokens, "nonpad_tokens": nonpad, "seconds": round(seconds, 3),
                      "tok_per_s": round(tokens / seconds, 1), "gpu_peak_gib": gpu_peak_gib(),
                      "host_peak_gib": host_peak_gib()})


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="step", required=True)
    w = sub.add_parser("write")
    w.add_argument("--shape", default="7b")
    w.add_argument("--out", required=True)
    w.add_argument("--tokenizer", default="../shared/models/ref-llama-27m")
    w.add_argument("--json")
    p = sub.add_parser("plain")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/alpaca/alpaca_5000.json")
    p.add_argument("--micro-batches", type=int, default=128)
    p.add_argument("--accumulate", type=int, default=16)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--json")
    args = ap.parse_args()
    {"write": write_checkpoint, "plain": plain_loop}[args.step](args)


if __name__ == "__main__":
    main()
