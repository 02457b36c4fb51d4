"""Several GPUs: data-parallel pruning (1 vs N processes) and the LoRA stage of `slimflow fit` under ddp / fsdp2 /
fsdp (N GPUs) against 1 GPU, on a LLaMA-2 shape with random bf16 weights.

    python -m benchmarks.multi_gpu run --shape 7b --gpus 2 --out benchmarks/results/multi_gpu_7b.json

1. Writes the random checkpoint (bf16, with the reference model's tokenizer) to `--work`.
2. Pruning: `torchrun --nproc_per_node {1, N}` of the `prune` subcommand (`slimflow.prune` shares the
   calibration sequences over the ranks); wall time, phase times and peak memory per rank, and whether the kept
   heads and channels equal the 1-process run.
3. LoRA: `slimflow fit` with `--trainer.devices 1` and with `--trainer.devices N` for each strategy (pruning in
   `setup` as usual, on fewer calibration tokens); the `Throughput` callback measures training tokens/s after a
   warm-up and the peak memory of every rank. The per-device batch is the same in every run, so N devices train
   N times the global batch (scaling efficiency = tokens/s(N) / (N · tokens/s(1))).

NCCL's NVLink multicast (NVLS) stays off: `NCCL_NVLS_ENABLE=0`, `TORCH_SYMM_MEM_DISABLE_MULTICAST=1`,
`NVSHMEM_DISABLE_NVLS=1` are set for every launched process. CPU rehearsal (gloo, tiny shape, no `fsdp`, which
needs CUDA):

    python -m benchmarks.multi_gpu run --shape tiny --gpus 2 --accelerator cpu --samples 16 --seqlen 64 \\
        --ratio 0.05 --prune_batch_size 4 --fit_samples 4 --steps 12 --warmup 4 --cutoff_len 256 --records 200 \\
        --out runs/multi_gpu_cpu.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # host RSS (KiB on Linux)


class Throughput(Callback):
    """Training tokens/s (non-padding tokens of all ranks) from the end of batch `warmup` to the end of training,
    and each rank's peak memory (GPU allocated, or host RSS on CPU); rank 0 writes them as JSON to `out`."""

    def __init__(self, out: str, warmup: int = 5):
        self.out, self.warmup = out, warmup
        self.tokens, self.batches, self.started = 0, 0, None

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches == self.warmup:
            self._sync(trainer)
            self.started = time.perf_counter()
        elif self.batches > self.warmup:
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(trainer)
        seconds = time.perf_counter() - self.started if self.started else float("nan")
        device = trainer.strategy.root_device
        mine = torch.tensor([float(self.tokens), _peak_memory_gib(device)], dtype=torch.float64, device=device)
        every = trainer.strategy.all_gather(mine).reshape(-1, 2).cpu()
        if trainer.is_global_zero:
            tokens = float(every[:, 0].sum())
            Path(self.out).write_text(json.dumps({
                "strategy": type(trainer.strategy).__name__, "devices": trainer.world_size,
                "measured_batches_per_rank": self.batches - self.warmup, "seconds": round(seconds, 3),
                "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                "peak_memory_gib_per_rank": every[:, 1].tolist(),
                "memory_kind": "gpu_allocated" if device.type == "cuda" else "host_rss",
            }, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- subcommands
def prune(model: str, samples: int = 128, seqlen: int = 2048, ratio: float = 0.2, batch_size: int = 8,
          dtype: str = "bfloat16", out: str = "prune.json") -> None:
    """One rank of the data-parallel pruning benchmark (launched by torchrun; one process is the baseline)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import slimflow

    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    net = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    ids = torch.randint(3, net.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    started = time.perf_counter()
    report = slimflow.prune(net, ids, ratio=ratio, batch_size=batch_size, device=device, progress=False)
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    wall = time.perf_counter() - started
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, _peak_memory_gib(device))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({
            "processes": dist.get_world_size(), "wall_s": round(wall, 2), "phases_s": report.phase_times,
            "peak_memory_gib_per_rank": peaks, "memory_kind": "gpu_allocated" if cuda else "host_rss",
            "kept": [[r.kept_units, r.kept_channels] for r in report.layers],
            "params_after": report.params_after,
        }, indent=2) + "\n")
    dist.destroy_process_group()


def _launch(cmd: list[str], log: Path, timeout: float, processes: int = 1) -> float:
    threads = str(max(1, (os.cpu_count() or 1) // processes))  # torchrun would give 1 thread to N > 1 only
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return round(time.perf_counter() - started, 1)


def _fit_config(work: Path, name: str, accelerator: str, devices: int, strategy: str, args: dict) -> Path:
    import yaml

    precision = "bf16-mixed" if accelerator == "cuda" else "32-true"
    config = {
        "seed_everything": 42,
        "trainer": {
            "default_root_dir": str(work / name), "accelerator": accelerator, "devices": devices,
            "strategy": strategy, "precision": precision, "max_steps": args["steps"], "max_epochs": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False, "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "slimflow.lightning.Calibration",
                 "init_args": {"source": args["calibration"], "num_samples": args["fit_samples"],
                               "seqlen": args["seqlen"], "skip_tokens": 400000}},
                {"class_path": "slimflow.lightning.StructuredPruning",
                 "init_args": {"ratio": args["ratio"], "progress": False}},
                {"class_path": "slimflow.lightning.LoRARecovery", "init_args": {"r": 8, "alpha": 16}},
                {"class_path": "benchmarks.multi_gpu.Throughput",
                 "init_args": {"out": str(work / f"{name}.json"), "warmup": args["warmup"]}},
            ],
        },
        "model": {"class_path": "slimflow.lightning.CausalLMModule",
                  "init_args": {"pretrained": str(work / "model"), "dtype": "bfloat16" if accelerator == "cuda"
                                else "float32", "warmup_steps": 2}},
        "data": {"class_path": "slimflow.lightning.InstructionData",
                 "init_args": {"path": args["alpaca"], "cutoff_len": args["cutoff_len"], "val_size": 8,
                               "limit": args["records"], "batch_size": args["batch_size"]}},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(shape: str = "7b", gpus: int = 2, accelerator: str = "cuda", samples: int = 128, seqlen: int = 2048,
        ratio: float = 0.2, prune_batch_size: int = 8, check_samples: int = 16, fit_samples: int = 16, steps: int = 60, warmup: int = 10, batch_size: int = 4,
        cutoff_len: int = 512, records: int = 2000, strategies: list[str] | None = None,
        work: str = "runs/multi_gpu_work", out: str = "benchmarks/results/multi_gpu.json",
        tokenizer: str = "../shared/models/ref-llama-27m", alpaca: str = "../shared/data/alpaca/alpaca_5000.json",
        calibration: str = "../shared/pretrain_corpus/part-007.txt.gz", timeout: float = 1800) -> dict:
    """The whole benchmark (see the module docstring); writes `out` and prints a markdown table.

    Args:
        prune_batch_size: calibration sequences per forward pass. Keep `samples / gpus` a multiple of it: then
            every process sees the same batch shapes as the 1-process run, whose bf16 activations are otherwise
            rounded differently (on random weights, near-tied scores then flip some decisions).
        check_samples: sequences of the float32 runs (1 and N processes) that check the decisions: in bf16
            the compensated weights round differently when the Hessians are summed in another order, and
            on random weights that flips near-tied decisions of later layers.
        strategies: multi-device strategies of the LoRA stage (default: ddp, fsdp2, and fsdp on CUDA).
    """
    from transformers import AutoTokenizer

    from benchmarks.common import build_model, device_info

    cuda = accelerator == "cuda"
    strategies = strategies or (["ddp", "fsdp2", "fsdp"] if cuda else ["ddp", "fsdp2"])
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    alpaca, calibration = str(Path(alpaca).resolve()), str(Path(calibration).resolve())
    t = time.perf_counter()
    net = build_model(shape, device="cuda" if cuda else "cpu")
    net.save_pretrained(work_dir / "model")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(work_dir / "model")
    del net
    result = {"device": device_info(), "shape": shape, "gpus": gpus, "accelerator": accelerator,
              "env": NO_MULTICAST, "checkpoint_s": round(time.perf_counter() - t, 1), "prune": {}, "lora": {}}

    def pruned(n: int, name: str, count: int, dtype: str) -> dict:
        path = work_dir / f"{name}_{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "benchmarks.multi_gpu", "prune", str(work_dir / "model"), "--samples", str(count),
               "--seqlen", str(seqlen), "--ratio", str(ratio), "--batch_size", str(prune_batch_size),
               "--dtype", dtype, "--out", str(path)]
        launched = _launch(cmd, work_dir / f"{name}_{n}.log", timeout, n)
        return json.loads(path.read_text()) | {"launch_s": launched}

    counts = sorted({1, gpus})
    result["prune"] = {n: pruned(n, "prune", samples, "bfloat16") for n in counts}
    check = {n: pruned(n, "check", check_samples, "float32") for n in counts}
    for runs, key in ((result["prune"], "bf16"), (check, "fp32")):
        kept = runs[1]["kept"]
        for n in counts:
            result["prune"][n][f"same_decisions_as_1_{key}"] = runs[n]["kept"] == kept
            result["prune"][n][f"layers_with_same_decisions_{key}"] = sum(
                a == b for a, b in zip(runs[n]["kept"], kept)) / len(kept)
    for r in result["prune"].values():
        del r["kept"]
    result["prune_speedup"] = round(result["prune"][1]["wall_s"] / result["prune"][gpus]["wall_s"], 3)

    args = dict(steps=steps, warmup=warmup, fit_samples=fit_samples, seqlen=seqlen, ratio=ratio,
                batch_size=batch_size, cutoff_len=cutoff_len, records=records, alpaca=alpaca,
                calibration=calibration)
    runs = [("single", 1, "auto")] + [(s, gpus, s) for s in strategies]
    for name, devices, strategy in runs:
        config = _fit_config(work_dir, name, accelerator, devices, strategy, args)
        launched = _launch([sys.executable, "-m", "slimflow.cli", "fit", "--config", str(config)],
                           work_dir / f"{name}.log", timeout, devices)
        result["lora"][name] = json.loads((work_dir / f"{name}.json").read_text()) | {"fit_s": launched}
    base = result["lora"]["single"]["tokens_per_s"]
    for name, r in result["lora"].items():
        r["scaling_efficiency"] = round(r["tokens_per_s"] / (r["devices"] * base), 3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    rows = ["| stage | processes | wall s | tokens/s | efficiency | peak memory per rank (GiB) | same decisions "
            "(fp32 check; bf16 layers) |", "|---|---:|---:|---:|---:|---|---|"]
    for n, r in result["prune"].items():
        rows.append(f"| pruning | {n} | {r['wall_s']} | | {result['prune'][1]['wall_s'] / (r['wall_s'] * int(n)):.2f} "
                    f"| {r['peak_memory_gib_per_rank']} | {r['same_decisions_as_1_fp32']}; "
                    f"{r['layers_with_same_decisions_bf16']:.0%} |")
    for name, r in result["lora"].items():
        rows.append(f"| LoRA {name} | {r['devices']} | {r['seconds']} | {r['tokens_per_s']} | {r['scaling_efficiency']} "
                    f"| {r['peak_memory_gib_per_rank']} | |")
    return "\n".join(rows)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli([run, prune])
