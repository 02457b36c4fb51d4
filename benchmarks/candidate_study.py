"""Every candidate of the adaptive search, pruned twice: as the search prunes it (its 32 search rows) and as the
final pass would (every calibration row). Scored on the search's held-out rows, the evaluation text, held-out
random windows and (optionally) the validation books, so that a selection rule can be judged on its own data:
does the search rank its candidates as their final prunes rank on text the search never saw?

    python -c "from benchmarks.candidate_study import main; main(model='runs/ref-llama-27m', \
        data='.carry/grid_data.safetensors', calibration='random-128x512-s0', ratio=0.2, sampled=256, \
        out='runs/candidates.json')"
"""

from __future__ import annotations

import copy
import json
import time

import torch


def main(*, model: str, data: str, calibration: str, ratio: float = 0.2, damp: float = 0.01, sampled: int = 256,
         seed: int = 0, out: str = "runs/candidates.json", books: str | None = None, device: str = "auto",
         windows: int = 300, options: dict | None = None) -> list[dict]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import slimflow
    from benchmarks.quality_grid import _book_ppl, _perplexity, open_grid_data
    from slimflow import allocation
    from slimflow.evaluation.perplexity import perplexity_of_ids
    from slimflow.method_options import slimgpt
    from slimflow.pipeline import prune_layers

    torch.manual_seed(0)
    dev, tensors = open_grid_data(data, device)
    val = {k: v.long() for k, v in load_file(books).items()} if books else None
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev).eval()
    seen = {}
    search = allocation.search_plans

    def recording(model_, adapter, calibration_, candidates, method, device_, *args, **kwargs):
        seen.update(adapter=adapter, calibration=calibration_, candidates=candidates, method=method)
        return search(model_, adapter, calibration_, candidates, method, device_, *args, **kwargs)

    allocation.search_plans = recording
    try:
        t = time.perf_counter()
        report = slimflow.prune(copy.deepcopy(dense), tensors[calibration], ratio=ratio, schedule="adaptive",
                                method=slimgpt(damp=damp), device=dev, progress=False, batch_size=16,
                                generated_samples=sampled, seed=seed, schedule_options=options)
        seconds = time.perf_counter() - t
    finally:
        allocation.search_plans = search
    info = report.settings["allocation"]["search"]
    ids = seen["calibration"]
    pruning, held = allocation.search_rows(ids.shape[0], *info["split"])
    head = {"model": model, "calibration": calibration, "ratio": ratio, "damp": damp, "sampled": sampled,
            "seed": seed, "options": options, "chosen": info["chosen"], "prune_s": round(seconds, 1),
            "held_rows": held, "device": str(dev), "rows": []}
    for name, plans in seen["candidates"].items():
        row = {"plan": name, "search_score": info["scores"][name],
               "widths": [(p.remove_units, p.remove_channels) for p in plans]}
        for tag, rows in (("final", ids), ("search", ids[pruning])):
            trial = copy.deepcopy(dense)
            prune_layers(trial, seen["adapter"], rows, plans, seen["method"], dev, 16, progress=False)
            row[f"{tag}_eval"] = round(_perplexity(trial, tensors["eval"], windows, dev), 3)
            row[f"{tag}_holdout"] = round(perplexity_of_ids(trial, tensors["holdout"].reshape(-1), 512, batch_size=32,
                                                            device=dev, progress=False)[0], 3)
            row[f"{tag}_held"] = [round(allocation.holdout_score(trial, ids[r : r + 1], 16), 5) for r in held]
            if val is not None and tag == "final":
                row |= {k: round(v, 3) for k, v in _book_ppl(trial, val, dev).items()}
            del trial
        head["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("widths", "final_held", "search_held")}), flush=True)
        with open(out, "w") as f:
            json.dump(head, f, indent=1)
    return head["rows"]
