"""Recovery after pruning: none vs Alpaca LoRA vs distillation LoRA vs both, same steps, same batch shapes.

The dense reference model is pruned once per ratio (SlimGPT, default schedule, calibration from the tail of
part-007); each recovery variant finetunes its own copy of that pruned model with LoRA for the same number of
steps: `alpaca` on Alpaca responses (next-token loss), `distill` on windows of part-007 after its first 400k
tokens against the dense model's logits (KL, temperature T, T² scaling), `mixed` on both losses. Then the
held-out perplexity (first windows of part-007) and the seven zero-shot tasks.

    python -m benchmarks.recovery_distill --out runs/recovery --steps 60 --limit 50
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REF = "../shared/models/ref-llama-27m"
HELDOUT = "../shared/pretrain_corpus/part-007.txt.gz"
ALPACA = "../shared/data/alpaca/alpaca_5000.json"
WEIGHTS = {"alpaca": (1.0, 0.0), "distill": (0.0, 1.0), "mixed": (1.0, 1.0)}  # (lm_weight, distill_weight)


def recover(pruned, variant: str, model: str, steps: int, batch: int, seqlen: int, lr: float, r: int,
            temperature: float, seed: int, workdir: str, accelerator: str = "cpu", heldout: str = HELDOUT,
            alpaca: str = ALPACA) -> tuple:
    from slimflow.lightning import LoRARecovery
    from slimflow.lightning.data import InstructionData
    from slimflow.lightning.module import CausalLMModule

    pl.seed_everything(seed, verbose=False)
    lm_weight, distill_weight = WEIGHTS[variant]
    module = CausalLMModule(model, lr=lr, warmup_steps=max(1, steps // 10), lm_weight=lm_weight,
                            distill_weight=distill_weight, distill_temperature=temperature)
    module.model = copy.deepcopy(pruned).train()
    data = InstructionData(alpaca, tokenizer=model, cutoff_len=seqlen, val_size=8, batch_size=batch,
                           limit=steps * batch + 64, seed=seed, distill_text=heldout if distill_weight else None,
                           distill_seqlen=seqlen, distill_skip_tokens=400_000)
    trainer = pl.Trainer(default_root_dir=workdir, max_steps=steps, accelerator=accelerator, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[LoRARecovery(r=r, alpha=2 * r, dropout=0.05)])
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    used = data.train_set[: steps * batch]
    tokens = {"alpaca_tokens": sum(len(e["input_ids"]) for e in used) if lm_weight else 0,
              "distill_tokens": steps * batch * seqlen if distill_weight else 0,
              "train_seconds": round(time.perf_counter() - started, 1)}
    return module.model.eval(), tokens


def main(out: str = "runs/recovery", model: str = REF, ratios: list[float] = [0.2, 0.5],
         variants: list[str] = ["none", "alpaca", "distill", "mixed"], steps: int = 60, batch: int = 8,
         seqlen: int = 128, lr: float = 1e-3, r: int = 8, temperature: float = 2.0, limit: int | None = 50,
         ppl_windows: int = 300, num_samples: int = 128, calib_seqlen: int = 512, seed: int = 0,
         accelerator: str = "cpu", heldout: str = HELDOUT, alpaca: str = ALPACA, zero_shot: bool = True) -> dict:
    """Run the comparison and write `<out>/recovery.json` after every variant.

    Args:
        out: output directory.
        model: dense model directory (also the distillation teacher).
        ratios: fractions of all parameters removed.
        variants: `none`, `alpaca`, `distill`, `mixed`.
        steps: LoRA optimizer steps of every recovery variant.
        batch: sequences per step (Alpaca examples and/or distillation windows).
        seqlen: Alpaca cutoff length and distillation window length.
        lr: peak LoRA learning rate (warm-up over a tenth of the steps, then cosine).
        r: LoRA rank (alpha 2r, dropout 0.05, all seven projections).
        temperature: distillation temperature.
        limit: documents per zero-shot task (None: all).
        ppl_windows: held-out windows of 128 tokens scored (from part-007's first 400k tokens).
        num_samples: calibration sequences (tail of part-007).
        calib_seqlen: calibration sequence length.
        seed: seed of data order, LoRA init and dropout.
        accelerator: where pruning, finetuning and evaluation run (`cpu` or `gpu`).
        heldout: part-007 (calibration, distillation text and held-out perplexity).
        alpaca: Alpaca JSON file.
        zero_shot: also score the seven zero-shot tasks (needs lm-eval).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimflow.api import prune
    from slimflow.data.calibration import calibration_ids
    if accelerator == "cpu":
        torch.set_num_threads(2)
    dev = "cuda" if accelerator == "gpu" else "cpu"
    Path(out).mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    calibration = calibration_ids(heldout, tok, num_samples=num_samples, seqlen=calib_seqlen, sampling="tail")
    results = {"settings": {k: v for k, v in locals().items() if k in (
        "model", "ratios", "variants", "steps", "batch", "seqlen", "lr", "r", "temperature", "limit",
        "ppl_windows", "num_samples", "calib_seqlen", "seed", "accelerator")}, "runs": []}

    def evaluate(net):
        net = net.to(dev)
        if not zero_shot:  # perplexity alone needs neither lm-eval nor datasets
            from dataclasses import asdict

            from slimflow.evaluation.perplexity import evaluate_perplexity
            spec = f"{heldout}:128:400000"
            return {"perplexity": {spec: asdict(evaluate_perplexity(net, tok, spec, batch_size=16,
                                                                    max_windows=ppl_windows, progress=False))}}
        from slimflow.evaluation.suite import evaluate_model
        from slimflow.evaluation.zeroshot import SEVEN
        return evaluate_model(net, tok, ppl=[f"{heldout}:128:400000"], tasks=list(SEVEN), limit=limit,
                              max_windows=ppl_windows, batch_size=16, progress=False)

    for ratio in ratios:
        dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        report = prune(dense, calibration, ratio=ratio, progress=False, device=dev)
        for variant in variants:
            if variant == "none":
                net, tokens = dense, {}
            else:
                net, tokens = recover(dense, variant, model, steps, batch, seqlen, lr, r, temperature, seed,
                                      str(Path(out) / "work"), accelerator, heldout, alpaca)
            metrics = evaluate(net)
            results["runs"].append({"ratio": ratio, "variant": variant, "params": report.params_after, **tokens,
                                    "metrics": metrics})
            Path(out, "recovery.json").write_text(json.dumps(results, indent=1, default=str))
            print(json.dumps({"ratio": ratio, "variant": variant, **tokens}), flush=True)
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
