"""The adaptive schedule on a GPU with little free memory: a 7B shape kept on the CPU, the device's free memory
cut to `--free-gib` by one allocation held for the whole run (what a smaller card or a shared GPU leaves).

Cases, one model (unchanged by a refused or failed run, checked): the default adaptive prune (256 sampled
sequences), then without sampled sequences at each `--batch-sizes` value down to the first that prunes. Each row records the outcome
(`pruned`, or the one-line error the CLI would print), wall time, per-phase times and peak GPU memory above the
held allocation. Random weights: decisions meaningless, memory and timings real.

    python -m benchmarks.adaptive_memory --free-gib 24 --batch-sizes 8 2 --out results/adaptive_memory_24g.json
"""

from __future__ import annotations

import argparse
import time

import torch

import slimflow
from benchmarks.common import build_model, device_info, gib, write
from slimflow.errors import out_of_memory_in, user_error_in


def _case(model, calib, generated_samples, batch_size, held: int) -> dict:
    before = sum(p.numel() for p in model.parameters())
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    row = {"generated_samples": generated_samples, "batch_size": batch_size}
    try:
        report = slimflow.prune(model, calib, 0.2, schedule="adaptive", device="cuda", batch_size=batch_size,
                                progress=False, generated_samples=generated_samples)
    except Exception as error:  # noqa: BLE001 - record what a user would see, then go on
        message = user_error_in(error) or out_of_memory_in(error)
        if message is None:
            raise
        row |= {"outcome": f"error: {message}", "seconds_to_error": round(time.perf_counter() - t, 1),
                "model_unchanged": sum(p.numel() for p in model.parameters()) == before,
                "model_on_cpu": all(p.device.type == "cpu" for p in model.parameters())}
    else:
        row |= {"outcome": "pruned", "wall_s": round(report.wall_time, 1), "phases_s": report.phase_times,
                "realised_fraction": round(report.realised_fraction, 4),
                "chosen": report.settings["allocation"].get("search", {}).get("chosen")}
    row["peak_gpu_gib_above_held"] = gib(torch.cuda.max_memory_allocated() - held)
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--free-gib", type=float, default=24.0)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--out")
    args = ap.parse_args()
    calib = torch.randint(3, 32000, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    model = build_model(args.shape, device="cuda", home="cpu")
    build_s = round(time.perf_counter() - t, 1)
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    held = torch.empty(max(free - int(args.free_gib * (1 << 30)), 0), dtype=torch.uint8, device="cuda")
    out = {"device": device_info(), "args": vars(args), "build_s": build_s,
           "free_gib_during_runs": gib(torch.cuda.mem_get_info()[0]), "runs": []}
    out["runs"].append(_case(model, calib, None, 8, held.numel()))
    write(args.out, out)
    for batch_size in args.batch_sizes:  # down to the first that prunes
        out["runs"].append(_case(model, calib, 0, batch_size, held.numel()))
        write(args.out, out)
        if out["runs"][-1]["outcome"] == "pruned":
            break
    del held


if __name__ == "__main__":
    main()
