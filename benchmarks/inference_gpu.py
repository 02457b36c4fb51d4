"""Inference speed of pruned LLaMA-2-7B shapes (random bf16 weights, SDPA, HF `generate`).

Dense and pruned models at each ratio: prefill throughput (batch × prompt tokens through one forward) and
greedy decode latency (batch 1, `--new-tokens` tokens) with the dynamic cache (eager, as HF runs by default)
and with the static cache, which `generate` compiles with CUDA graphs ("reduce-overhead"); parameters and
weight memory. Pruned shapes come from `--method` (default `magnitude`: the same widths as `slimgpt`, since
the widths depend only on the ratio schedule, without the calibration cost).

    python -m benchmarks.inference_gpu --shape 7b --ratios 0 0.2 0.5 --out results/inference_7b.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import slimflow
from benchmarks.common import build_model, device_info, gib, peak_gib, peak_reset, sync, write


def timed(fn, reps: int) -> float:
    """Median wall seconds of `fn()` over `reps` runs (synchronised), after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def measure(model, args, device) -> dict:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 32000, (args.prefill_batch, args.prefill_len), generator=g).to(device)
    prefill_s = timed(lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1), args.reps)
    short = torch.randint(3, 32000, (1, args.prompt_len), generator=g).to(device)
    n = args.new_tokens

    def gen(**kw):
        out = model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        assert out.shape[1] == args.prompt_len + n

    row = {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_gib": gib(sum(p.numel() * p.element_size() for p in model.parameters())),
        "prefill_s": round(prefill_s, 4),
        "prefill_tok_per_s": round(prompt.numel() / prefill_s),
    }
    if args.eager:
        row["decode_eager_ms_per_token"] = round(timed(gen, args.reps) / n * 1e3, 3)
    if args.static and device.type == "cuda":
        try:
            t = time.perf_counter()
            gen(cache_implementation="static")  # first call compiles
            row["static_compile_s"] = round(time.perf_counter() - t, 1)
            row["decode_static_ms_per_token"] = round(timed(lambda: gen(cache_implementation="static"), args.reps)
                                                      / n * 1e3, 3)
        except Exception as e:  # noqa: BLE001 - report and go on with the eager numbers
            row["static_error"] = f"{type(e).__name__}: {e}"[:400]
        torch._dynamo.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--channel-multiples", type=int, nargs="+", default=[1, 64],
                    help="FFN widths rounded to these multiples (1: the exact schedule); one row each")
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-static", dest="static", action="store_false")
    ap.add_argument("--no-eager", dest="eager", action="store_false")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": device_info(), "args": vars(args), "rows": []}
    dense = build_model(args.shape, device=str(device), home=str(device))
    calib = torch.randint(3, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    cases = [(r, m) for r in args.ratios for m in (args.channel_multiples if r else [1])]
    for ratio, multiple in cases:
        model = dense if ratio == 0 else copy.deepcopy(dense)
        model.__dict__.pop("_compiled_call", None)  # generate's compiled forward is bound to the model it came from
        if ratio:
            slimflow.prune(model, calib, ratio=ratio, method=args.method, device=device, progress=False,
                           channel_multiple=multiple)
        peak_reset()
        row = {"ratio": ratio, "channel_multiple": multiple} | measure(model, args, device)
        row["peak_gpu_gib"] = peak_gib()
        out["rows"].append(row)
        print(row, flush=True)
        if model is not dense:
            del model
        write(args.out, out)
    base = out["rows"][0]
    for row in out["rows"]:
        row["param_fraction"] = round(row["params"] / base["params"], 4)
        row["prefill_speedup"] = round(base["prefill_s"] / row["prefill_s"], 3)
        if "decode_eager_ms_per_token" in row:
            row["decode_eager_speedup"] = round(base["decode_eager_ms_per_token"] / row["decode_eager_ms_per_token"], 3)
        if "decode_static_ms_per_token" in row and "decode_static_ms_per_token" in base:
            row["decode_static_speedup"] = round(base["decode_static_ms_per_token"] / row["decode_static_ms_per_token"], 3)
    write(args.out, out)


if __name__ == "__main__":
    main()
