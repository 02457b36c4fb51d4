"""How much can any per-layer allocation gain? Prune with many hand-made plans at one budget and score each on
the evaluation text and the validation books (an oracle: the plans are judged on the text that reports them).

Every plan removes a fixed number of whole head units (key/value groups) per layer and fills the rest of the
budget with FFN channels, spread flat, rising or falling with depth. The fixed shapes and the adaptive schedule
run on the same calibration tensor for reference. With `sampled` (e.g. 256, what `--schedule adaptive` adds by
default) that many sequences sampled from the dense model (seed `seed`) follow the calibration rows in every
run, as `slimflow.prune` appends them.

    python -m benchmarks.plan_oracle --model runs/gqa/ref-llama-gqa-12m --data .carry/grid_data.safetensors \
        --books .carry/books.safetensors --calibration random-128x512-s0 --ratio 0.2 --out runs/oracle.json
"""

from __future__ import annotations

import copy
import json
import time

import torch

HEAD_PATTERNS = {  # removed units per layer, written for 8 layers and stretched to the model's depth
    "flat1": [1] * 8, "none": [0] * 8, "flat2": [2] * 8, "rise": [0, 0, 1, 1, 1, 1, 2, 2],
    "rise-ends": [0, 1, 1, 1, 1, 1, 1, 2], "fall": [2, 2, 1, 1, 1, 1, 0, 0], "late2": [0, 0, 0, 0, 2, 2, 2, 2],
    "early2": [2, 2, 2, 2, 0, 0, 0, 0], "late1": [0, 0, 0, 0, 1, 1, 1, 1], "early1": [1, 1, 1, 1, 0, 0, 0, 0],
    "keep-first": [0, 1, 1, 1, 1, 1, 1, 1],
}
FFN_SHAPES = {"flat": lambda x: 1.0, "rise": lambda x: 0.5 + x, "fall": lambda x: 1.5 - x}


def _stretch(pattern: list[int], layers: int) -> list[int]:
    return [pattern[i * len(pattern) // layers] for i in range(layers)]


def hand_plans(shapes, target_params: int, channel_multiple: int = 1) -> dict:
    """Plans of `HEAD_PATTERNS` × `FFN_SHAPES` that remove `target_params` (to one channel step) within the
    layers' limits (at least one unit and one channel step kept)."""
    from slimflow.algorithms.schedules import LayerPlan, layer_limits

    out = {}
    n = len(shapes)
    for hname, pattern in HEAD_PATTERNS.items():
        units = _stretch(pattern, n)
        limits = [layer_limits(s, channel_multiple) for s in shapes]
        if any(u > lim[0] for u, lim in zip(units, limits)):
            continue
        rest = target_params - sum(u * s.unit_params for u, s in zip(units, shapes))
        for fname, weight in FFN_SHAPES.items():
            w = [weight(i / max(n - 1, 1)) for i in range(n)]
            want = [rest * wi / sum(w) for wi in w]
            channels = [min(lim[1], channel_multiple * round(x / s.channel_params / channel_multiple))
                        for x, s, lim in zip(want, shapes, limits)]
            if rest < 0 or any(c < 0 for c in channels):
                continue
            out[f"heads:{hname}/ffn:{fname}"] = [
                LayerPlan((u * s.unit_params + c * s.channel_params) / s.prunable, u, c)
                for u, c, s in zip(units, channels, shapes)]
    return out


def main(*, model: str, data: str, calibration: str, ratio: float = 0.2, books: str | None = None,
         out: str = "runs/oracle.json", windows: int = 300, device: str = "auto", sampled: int = 0,
         seed: int = 0, hand: bool = True, families: list[str] | None = None,
         options: dict | None = None, variants: list[dict] | None = None) -> list[dict]:
    """`hand=False`: only the schedules. `families`: one more adaptive run, scoring those candidate families
    (with the other adaptive `options`, e.g. `{"holdout": 64}`). `variants`: one more adaptive run for each of
    these schedule options (e.g. `{"score_on": "text"}`). These extra runs get the calibration text and sample
    their `sampled` rows themselves, as `slimflow.prune` does (the same rows: same call, seed and device)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from benchmarks.quality_grid import _book_ppl, _perplexity, open_grid_data
    from slimflow import api, surgery
    from slimflow.adapters import get_adapter
    from slimflow.methods import get_method
    from slimflow.pipeline import prune_layers

    torch.manual_seed(0)
    dev, tensors = open_grid_data(data, device)
    val = {k: v.long() for k, v in load_file(books).items()} if books else None
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev)
    total = surgery.count_parameters(dense)
    ids = tensors[calibration]
    if sampled:
        from slimflow.data.generated import sample_sequences

        ids = torch.cat([ids, sample_sequences(dense, sampled, ids.shape[1], seed=seed, device=dev)])
    rows = []

    def record(name, pruned, seconds, widths):
        row = {"plan": name, "params": surgery.count_parameters(pruned),
               "removed": round(1 - surgery.count_parameters(pruned) / total, 4),
               "ppl": round(_perplexity(pruned, tensors["eval"], windows, dev), 3), "seconds": round(seconds, 1),
               "widths": widths}
        if val is not None:
            row |= {k: round(v, 3) for k, v in _book_ppl(pruned, val, dev).items()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
        with open(out, "w") as f:
            json.dump({"model": model, "calibration": calibration, "ratio": ratio, "sampled": sampled, "seed": seed,
                       "device": str(dev), "rows": rows}, f, indent=1)

    variants = ([{"families": families} | (options or {})] if families else []) + list(variants or [])
    runs = [("uniform", None, False), ("log_increase", None, False), ("adaptive", None, False)]
    runs += [("adaptive", dict(v), True) for v in variants]
    for schedule, opts, sampling in runs:  # a variant samples its rows itself, as slimflow.prune does
        trial = copy.deepcopy(dense)
        t = time.perf_counter()
        report = api.prune(trial, tensors[calibration] if sampling else ids, ratio, schedule, progress=False,
                           generated_samples=sampled if sampling else 0, seed=seed, device=dev,
                           schedule_options=opts)
        chosen = report.settings.get("allocation", {}).get("search", {}).get("chosen")
        name = schedule + (json.dumps(opts) if opts else "") + (f" ({chosen})" if chosen else "")
        record(name, trial, time.perf_counter() - t,
               [(w.num_key_value_heads, w.intermediate_size) for w in report.widths])
    adapter = get_adapter(dense)
    shapes = api.layer_shapes(dense, adapter)
    method = get_method("slimgpt")
    for name, plans in (hand_plans(shapes, round(ratio * total)) if hand else {}).items():
        trial = copy.deepcopy(dense)
        t = time.perf_counter()
        prune_layers(trial, adapter, ids, plans, method, dev, progress=False)
        record(name, trial, time.perf_counter() - t,
               [(s.head_units - p.remove_units, s.channels - p.remove_channels) for s, p in zip(shapes, plans)])
    return rows


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
