"""Probe: on a GQA model, remove query heads inside every key/value group instead of whole groups.

Each head unit of the plan becomes one round that removes one query head from every group (greedy OBS on
`o_proj`, SlimGPT's head score, compensation after each head), so a unit removes the same number of query
heads per group and every group keeps its keys and values. With 3 query heads per group and a head_dim of 32
(ref-llama-gqa-12m) a round removes 4 × (q rows + o columns) = 98,304 parameters, as many as one whole group,
so the plan's widths and the parameter count are unchanged. The probe swaps the pipeline's head step for the
run; measured worse than whole groups (docs/results.md), so the library keeps groups as its unit.

    python -m benchmarks.query_head_units --model runs/gqa/ref-llama-gqa-12m --data .carry/grid_data.safetensors \
        --calibration random-128x512-s0 --ratio 0.2 --schedule uniform --units query_heads
"""

from __future__ import annotations

import json
import time

import torch

import slimflow.pipeline as pipeline
from slimflow.adapters.base import slice_linear
from slimflow.algorithms.obs import condition_hessian, invert_hessian, remove_and_downdate
from slimflow.algorithms.slimgpt import _head_scores


def greedy_query_heads(weight, hinv, head_dim: int, rounds: int, groups: int, exact: bool = False):
    """`rounds` × `groups` query heads removed greedily, one per group per round; the compensated weight and
    the removed heads."""
    heads = weight.shape[1] // head_dim
    per_group = heads // groups
    alive = torch.ones(heads, dtype=torch.bool)
    removed, offsets = [], torch.arange(head_dim)
    for _ in range(rounds):
        taken = torch.zeros(groups, dtype=torch.bool)
        for _ in range(groups):
            scores, _ = _head_scores(weight, hinv, head_dim, exact)
            allowed = alive & ~taken.repeat_interleave(per_group)
            head = int(torch.argmin(scores.masked_fill(~allowed, float("inf"))))
            weight, _, hinv, _ = remove_and_downdate(weight, hinv, head * head_dim + offsets)
            alive[head] = False
            taken[head // per_group] = True
            removed.append(head)
    return weight, sorted(removed)


def remove_query_heads(job, exact: bool = False, damp: float = 0.01) -> None:
    """Stands in for `pipeline._remove_head_units`: the same statistics and replay, query heads as the unit."""
    adapter, layer = job.adapter, job.layer
    head_dim = adapter.head_dim(job.model)
    heads, groups = adapter.heads_of(layer, head_dim)
    o_proj = adapter.o_proj(layer)
    later_pass = job.plan.remove_channels or not job.last
    record = job.attention_buffer(o_proj) if job.replay_attention and later_pass else None
    stats = pipeline._collect_statistics(job, o_proj, "o_proj", record, None)
    weight = o_proj.weight.data.to(torch.float32).clone()
    hessian, _ = condition_hessian(stats.hessian.float(), weight, damp)
    hinv, _ = invert_hessian(hessian, damp)
    new, removed = greedy_query_heads(weight, hinv, head_dim, job.plan.remove_units, groups, exact)
    keep = [h for h in range(heads) if h not in set(removed)]
    pipeline._set_weight(o_proj, new.to(o_proj.weight.dtype), None)
    cols = pipeline._unit_columns(keep, head_dim)
    attn = adapter.attn(layer)
    attn.q_proj = slice_linear(attn.q_proj, cols, 0)
    attn.o_proj = slice_linear(attn.o_proj, cols, 1)
    adapter.set_head_counts(attn, len(keep), groups)
    if record is not None:
        job.replay = pipeline._AttentionReplay(adapter.o_proj(layer), record[1], cols.to(job.device))


def main(*, model: str, data: str, calibration: str, ratio: float = 0.2, schedule: str = "uniform",
         units: str = "query_heads", exact_head_score: bool = False, windows: int = 300) -> dict:
    """Prune with `units` = `query_heads` (this probe) or `kv_groups` (the library), print the perplexity."""
    from transformers import AutoModelForCausalLM

    from benchmarks.quality_grid import _perplexity, open_grid_data
    from slimflow import api

    torch.manual_seed(0)
    dev, tensors = open_grid_data(data, "cpu")
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    original = pipeline._remove_head_units
    if units == "query_heads":
        pipeline._remove_head_units = lambda job: remove_query_heads(job, exact_head_score)
    try:
        t = time.perf_counter()
        report = api.prune(dense, tensors[calibration], ratio, schedule, progress=False, generated_samples=0)
    finally:
        pipeline._remove_head_units = original
    row = {"units": units, "schedule": schedule, "ratio": ratio, "calibration": calibration,
           "exact_head_score": exact_head_score, "removed": round(report.realised_fraction, 4),
           "ppl": round(_perplexity(dense, tensors["eval"], windows, dev), 2),
           "seconds": round(time.perf_counter() - t),
           "widths": [(w.num_attention_heads, w.num_key_value_heads, w.intermediate_size) for w in report.widths]}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
