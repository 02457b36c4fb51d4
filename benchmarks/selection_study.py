"""How should the adaptive search pick among its candidates? One default adaptive prune (through
`slimflow.prune`, 256 sampled sequences) with every candidate's score recorded per held-out row, then the final
prune of the candidates that other selection rules would pick, on the same tensors. Rules (`RULES`): the row mean
(the search's own), the mean of the caller's text rows and of the sampled rows weighed alike, and the sum of a
candidate's ranks on the two. Uniform and log_increase are pruned too, for the comparison.

    python -c "from benchmarks.selection_study import main; main(model='runs/ref-llama-27m', \
        data='.carry/grid_data.safetensors', calibration='random-128x512-s0', ratio=0.2, out='runs/sel.json')"
"""

from __future__ import annotations

import copy
import json
import time

import torch


def _mean(values, rows):
    return sum(values[i] for i in rows) / len(rows)


def _ranks(values):
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    out = [0] * len(values)
    for r, i in enumerate(order):
        out[i] = r
    return out


def pick(scores: dict[str, list[float]], text: list[int], sampled: list[int], rule: str) -> str:
    """The candidate a rule keeps, from per-row held-out losses (`text` / `sampled`: positions of those rows)."""
    names = list(scores)
    if rule == "rows":
        value = [_mean(scores[n], text + sampled) for n in names]
    elif rule == "domains":
        value = [(_mean(scores[n], text) + _mean(scores[n], sampled)) / 2 for n in names]
    elif rule == "ranks":
        a = _ranks([_mean(scores[n], text) for n in names])
        b = _ranks([_mean(scores[n], sampled) for n in names])
        value = [x + y for x, y in zip(a, b)]
    elif rule == "text":
        value = [_mean(scores[n], text) for n in names]
    else:
        raise ValueError(rule)
    return names[min(range(len(names)), key=lambda i: (value[i], i))]


RULES = ("rows", "domains", "ranks", "text")


def main(*, model: str, data: str, calibration: str, ratio: float = 0.2, sampled: int = 256, seed: int = 0,
         out: str = "runs/sel.json", books: str | None = None, device: str = "auto", windows: int = 300,
         damp: float = 0.01) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import slimflow
    from benchmarks.quality_grid import _book_ppl, _perplexity, open_grid_data
    from slimflow import allocation
    from slimflow.method_options import slimgpt
    from slimflow.pipeline import prune_layers

    torch.manual_seed(0)
    dev, tensors = open_grid_data(data, device)
    val = {k: v.long() for k, v in load_file(books).items()} if books else None
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev).eval()
    text_rows = tensors[calibration].shape[0]
    seen, per_row = {}, []
    search, score = allocation.search_plans, allocation.holdout_score

    def recording_search(model_, adapter, calibration_, candidates, method, device_, *args, **kwargs):
        seen.update(adapter=adapter, calibration=calibration_, candidates=candidates, method=method)
        return search(model_, adapter, calibration_, candidates, method, device_, *args, **kwargs)

    def recording_score(model_, ids, batch_size=8, dense_=None, context=None):
        per_row.append([score(model_, ids[r : r + 1], batch_size, dense_, context) for r in range(ids.shape[0])])
        return score(model_, ids, batch_size, dense_, context)

    allocation.search_plans, allocation.holdout_score = recording_search, recording_score
    pruned = copy.deepcopy(dense)
    try:
        t = time.perf_counter()
        report = slimflow.prune(pruned, tensors[calibration], ratio=ratio, schedule="adaptive",
                                method=slimgpt(damp=damp), device=dev, progress=False, batch_size=16,
                                generated_samples=sampled, seed=seed)
        seconds = time.perf_counter() - t
    finally:
        allocation.search_plans, allocation.holdout_score = search, score
    info = report.settings["allocation"]["search"]
    ids = seen["calibration"]
    held = allocation.search_rows(ids.shape[0], *info["split"])[1]
    text = [i for i, r in enumerate(held) if r < text_rows]
    samp = [i for i, r in enumerate(held) if r >= text_rows]
    scores = dict(zip(seen["candidates"], per_row))
    picks = {rule: pick(scores, text, samp, rule) for rule in RULES}

    def measure(m):
        row = {"ppl": round(_perplexity(m, tensors["eval"], windows, dev), 3)}
        if val is not None:
            row |= {k: round(v, 3) for k, v in _book_ppl(m, val, dev).items()}
        return row

    finals = {info["chosen"]: measure(pruned)}  # the search's own pick, as slimflow.prune left it
    for name in dict.fromkeys([*picks.values(), "uniform", "log_increase:4"]):
        if name not in finals and name in seen["candidates"]:
            trial = copy.deepcopy(dense)
            prune_layers(trial, seen["adapter"], ids, seen["candidates"][name], seen["method"], dev, 16,
                         progress=False)
            finals[name] = measure(trial)
            del trial
    result = {"model": model, "calibration": calibration, "ratio": ratio, "seed": seed, "sampled": sampled,
              "damp": damp, "prune_s": round(seconds, 1), "held_rows": held, "text_rows": text_rows,
              "chosen": info["chosen"], "picks": picks, "finals": finals, "scores": scores, "device": str(dev)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"calibration": calibration, "ratio": ratio, "seed": seed, "picks": picks, "finals": finals}),
          flush=True)
    return result
