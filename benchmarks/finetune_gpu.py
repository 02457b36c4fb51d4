"""LoRA finetuning throughput: slimflow's Lightning stage (`CausalLMModule` + `LoRARecovery`) against a minimal
plain PyTorch + PEFT loop, on the same pruned model, LoRA config, optimizer and batches (bf16 weights, bf16-mixed
autocast, random tokens). Runs alternate (plain, Lightning, plain, Lightning) so warm-up order cannot favour one.

    python -m benchmarks.finetune_gpu --shape 7b --ratio 0.2 --out results/finetune_7b.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from lightning.pytorch import Callback, Trainer
from torch.optim.lr_scheduler import LambdaLR

import slimflow
from benchmarks.common import build_model, device_info, peak_gib, peak_reset, sync, write
from slimflow.lightning.lora import LoRARecovery
from slimflow.lightning.module import CausalLMModule, warmup_cosine

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_batches(n: int, batch: int, seqlen: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 32000, (batch, seqlen), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class StepTimer(Callback):
    """Wall time from the start of batch `warmup` to the end of the last batch (device synchronised)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.t0, self.seconds = warmup, steps, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.steps - 1:
            sync()
            self.seconds = time.perf_counter() - self.t0


def run_lightning(model, data, lora: LoRARecovery, args, workdir: str) -> tuple[float, float]:
    module = CausalLMModule(workdir, lr=1e-4, warmup_steps=10, dtype="bfloat16")
    module.model = model  # configure_model keeps a model that is already there
    timer = StepTimer(args.warmup, len(data))
    trainer = Trainer(accelerator="gpu" if DEV == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                      max_steps=len(data), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[lora, timer])
    peak_reset()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    peak = peak_gib()
    module.model.unload()  # drop the adapter layers again (no merge), back to the base model
    model.to(DEV)  # the Trainer's teardown moved the module to the CPU
    return timer.seconds, peak


def run_plain(model, data, lora: LoRARecovery, args) -> tuple[float, float]:
    from peft import get_peft_model

    peak_reset()
    peft_model = get_peft_model(model, lora.lora_config())
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = LambdaLR(opt, warmup_cosine(10, len(data)))
    for i, batch in enumerate(data):
        if i == args.warmup:
            sync()
            t0 = time.perf_counter()
        batch = {k: v.to(DEV, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = peft_model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - t0
    peak = peak_gib()
    peft_model.unload()
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = build_model(args.shape, device=DEV, home=DEV)
    calib = torch.randint(3, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    slimflow.prune(model, calib, ratio=args.ratio, method="magnitude", device=DEV, progress=False)
    model.train()
    data = make_batches(args.steps, args.batch, args.seqlen)
    tokens = (args.steps - args.warmup) * args.batch * args.seqlen
    out = {"device": device_info(), "args": vars(args), "params": sum(p.numel() for p in model.parameters()),
           "plain": [], "lightning": []}
    with tempfile.TemporaryDirectory() as workdir:
        from tests.tiny_models import tiny_tokenizer

        model.config.save_pretrained(workdir)
        tiny_tokenizer().save_pretrained(workdir)  # CausalLMModule loads a tokenizer; the data are token ids
        for _ in range(args.rounds):
            for name in ("plain", "lightning"):
                lora = LoRARecovery(r=8, alpha=16, dropout=0.05, merge=False)
                if name == "plain":
                    seconds, peak = run_plain(model, data, lora, args)
                else:
                    seconds, peak = run_lightning(model, data, lora, args, workdir)
                out[name].append({"tok_per_s": round(tokens / seconds), "seconds": round(seconds, 3),
                                  "peak_gpu_gib": peak})
                print(name, out[name][-1], flush=True)
    best = {k: max(r["tok_per_s"] for r in out[k]) for k in ("plain", "lightning")}
    out["lightning_over_plain"] = round(best["lightning"] / best["plain"], 4)
    write(args.out, out)


if __name__ == "__main__":
    main()
