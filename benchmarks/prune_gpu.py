"""Pruning wall time, per-phase times and peak GPU memory on LLaMA-2 shapes with random bf16 weights.

The model stays on the CPU; `slimflow.prune(..., device="cuda")` moves one layer at a time. Calibration is
random tokens (num_samples × seqlen). Random weights make the decisions meaningless, the timings real.

    python -m benchmarks.prune_gpu --shape 7b --ratios 0.2 0.5 --out results/prune_7b.json
"""

from __future__ import annotations

import argparse
import time

import torch

import slimflow
from slimflow.api import scoring_windows
from benchmarks.common import (build_model, copy_rate, device_info, gemm_rate, gib, peak_gib, peak_reset,
                               pruning_floor, write)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="slimgpt")
    ap.add_argument("--schedule", default=None, help="per-layer widths (default: the method's; adaptive samples "
                    "256 x 512 tokens from the model by default)")
    ap.add_argument("--channel-multiple", type=int, default=1)
    ap.add_argument("--scoring-windows", type=int, default=None, help="adaptive: random windows of --seqlen the "
                    "search scores on (default slimflow.api.scoring_windows, as `slimflow prune` draws)")
    ap.add_argument("--confirm", type=int, default=None, help="adaptive: candidates pruned again on every row "
                    "(default slimflow.allocation.CONFIRM)")
    ap.add_argument("--home", default="cpu", help="where the model lives (cpu: one layer at a time on the GPU)")
    ap.add_argument("--out")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    out = {"device": device_info(), "args": vars(args), "runs": []}
    if cuda:
        out["bf16_tflops"] = round(gemm_rate(8192, torch.bfloat16), 1)
        out["fp32_tflops"] = round(gemm_rate(8192, torch.float32), 1)
        out["copy_tbps"] = round(copy_rate(), 2)
        peak_reset()
    calib = torch.randint(3, 32000, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    scoring, options = None, None
    if args.schedule == "adaptive":
        count = args.scoring_windows or scoring_windows(args.seqlen)
        scoring = torch.randint(3, 32000, (count, args.seqlen), generator=torch.Generator().manual_seed(1))
        options = {"confirm": args.confirm} if args.confirm else None
    out["scoring_windows"] = 0 if scoring is None else int(scoring.shape[0])
    for ratio in args.ratios:
        t = time.perf_counter()
        model = build_model(args.shape, device="cuda" if cuda else "cpu", home=args.home)
        build_s = time.perf_counter() - t
        peak_reset()
        report = slimflow.prune(model, calib, ratio=ratio, method=args.method, device="cuda" if cuda else "cpu",
                                batch_size=args.batch_size, channel_multiple=args.channel_multiple, progress=False,
                                schedule=args.schedule, scoring=scoring, schedule_options=options)
        run = {
            "ratio": ratio, "build_s": round(build_s, 1), "wall_s": round(report.wall_time, 2),
            "phases_s": report.phase_times, "peak_gpu_gib": peak_gib(),
            "peak_gpu_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else 0.0,
            "params_before": report.params_before, "params_after": report.params_after,
            "realised_fraction": round(report.realised_fraction, 4),
            "heads": [w.num_attention_heads for w in report.widths],
            "channels": [w.intermediate_size for w in report.widths],
            "damping_added_max": max(r.damping_added for r in report.layers),
            "generated_samples": report.settings["generated_samples"],
            "search": {k: v for k, v in report.settings.get("allocation", {}).get("search", {}).items()
                       if k in ("chosen", "scores", "confirmed", "seconds")},
        }
        print(run, flush=True)
        if cuda:
            run["floor"] = pruning_floor(args.shape, args.samples * args.seqlen, args.seqlen, ratio,
                                         out["bf16_tflops"], out["fp32_tflops"])
            run["measured_over_floor"] = round(report.wall_time / run["floor"]["floor_s"], 2)
        out["runs"].append(run)
        print(f"{args.shape} ratio {ratio}: {report.wall_time:.1f} s, peak {run['peak_gpu_gib']} GiB, "
              f"phases {report.phase_times}", flush=True)
        write(args.out, out)
        del model, report


if __name__ == "__main__":
    main()
