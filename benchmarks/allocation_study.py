"""Every candidate allocation of the adaptive search, pruned in full and measured on several books.

The adaptive schedule keeps the candidate that scores best on held-out calibration rows. This study prunes
every candidate (all families of `slimflow.allocation.candidate_plans`) with the whole calibration set and
measures each pruned model on

- the protocol's evaluation text (first 300 windows of 128 tokens of part-007, one book),
- validation books: up to 12 windows of 512 tokens from each other book of part-007, taken only where neither
  calibration sampling reads (`tail` reads the last 65,536 tokens, `random` tokens 400,000-662,144), scored
  with 512 and with 128 tokens of context,

and records the search's own per-row held-out losses, so that selection rules can be compared offline on the
validation books without touching the evaluation text.

    python -m benchmarks.allocation_study prepare --out .carry/books.safetensors
    python -m benchmarks.allocation_study run --data .carry/grid_data.safetensors --books .carry/books.safetensors \
        --out runs/study --models '{"ref-llama-27m": "../shared/models/ref-llama-27m"}'
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.quality_grid import CORPUS, SKIP, WINDOW, WINDOWS, _calibration, _defaults, _perplexity, open_grid_data

RANDOM_END = SKIP + 4 * 128 * 512  # `random` calibration draws its windows from tokens [SKIP, RANDOM_END)
TAIL = 128 * 512 + 1
MARGIN = 1024  # tokens kept clear around every region a calibration set reads
PER_BOOK = 12


def prepare(*, out: str, tokenizer: str = "../shared/models/ref-llama-27m", corpus: str = CORPUS) -> None:
    """Validation windows of 512 tokens, per book of part-007, outside the evaluation and calibration text."""
    from safetensors.torch import save_file

    from slimflow.data.text import read_local_texts
    from slimflow.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    text = "\n\n".join(read_local_texts(corpus))
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids, ends = enc["input_ids"], [o[1] for o in enc["offset_mapping"]]
    bounds, start = [], 0  # documents end with the line <|endoftext|>
    while (k := text.find("<|endoftext|>", start)) != -1:
        bounds.append((start, k))
        start = k + len("<|endoftext|>")
    manifest = Path(corpus).with_name("manifest.tsv")
    titles = {}  # document index in the part -> title
    if manifest.is_file():
        for line in manifest.read_text().splitlines()[1:]:
            part, index, _, author, title, *_ = line.split("\t")
            if part == Path(corpus).name:
                titles[int(index)] = f"{author}: {title}"[:60]
    clean = [(WINDOWS * WINDOW + MARGIN, SKIP - MARGIN), (RANDOM_END + MARGIN, len(ids) - TAIL - MARGIN)]
    windows, books, names = [], [], []
    first = 0
    for b, (c0, c1) in enumerate(bounds):
        t0 = next(i for i in range(first, len(ids)) if ends[i] > c0)
        t1 = next((i for i in range(t0, len(ids)) if ends[i] >= c1), len(ids))
        first = t1
        spans = [(max(t0, a), min(t1, z)) for a, z in clean if min(t1, z) - max(t0, a) >= 512]
        starts = [s for a, z in spans for s in range(a, z - 511, 512)]
        if not starts:
            continue
        picked = [starts[(2 * k + 1) * len(starts) // (2 * min(PER_BOOK, len(starts)))]
                  for k in range(min(PER_BOOK, len(starts)))]
        windows += [torch.tensor(ids[s : s + 512]) for s in picked]
        books += [len(names)] * len(picked)
        names.append(titles.get(b, f"document {b}"))
    save_file({"windows": torch.stack(windows).to(torch.int32), "book": torch.tensor(books, dtype=torch.int32)},
              out, metadata={"names": json.dumps(names)})
    print(f"{len(windows)} windows from {len(names)} books: {names}")


@torch.no_grad()
def sequence_losses(model, ids: torch.Tensor, device, context: int | None = None, batch_size: int = 32) -> list[float]:
    """Mean next-token loss of every row of `ids`; with `context` each row is cut into windows of that many
    tokens, each scored alone, and the row's loss is their mean."""
    rows = ids if context is None else ids.reshape(-1, context)
    out = []
    for s in range(0, rows.shape[0], batch_size):
        batch = rows[s : s + batch_size].to(device)
        logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        out += (-logp.gather(-1, batch[:, 1:, None])[..., 0].mean(1)).tolist()
    if context is None:
        return out
    per = ids.shape[1] // context
    return [sum(out[i * per : (i + 1) * per]) / per for i in range(ids.shape[0])]


def book_summary(losses: list[float], book: torch.Tensor) -> list[float]:
    """Mean loss per book (every book weighs the same in the summaries)."""
    per: dict[int, list[float]] = {}
    for loss, b in zip(losses, book.tolist()):
        per.setdefault(b, []).append(loss)
    return [sum(v) / len(v) for _, v in sorted(per.items())]


def study_cells(models: list[str], ratios=(0.2, 0.5)) -> list[dict]:
    out = []
    for seed in (0, 1):
        for model in models:
            for ratio in ratios:
                for sampling in ("tail", "random"):
                    if seed == 1 and sampling == "tail":
                        continue  # the tail is one text: only the sampled sequences would change
                    for generated in (0, 256):
                        out.append(dict(group="main" if seed == 0 else "seeds", model=model, ratio=ratio,
                                        sampling=sampling, generated=generated, seed=seed, schedule="adaptive"))
    return _defaults(out)


def run(*, data: str, books: str, out: str, models: dict[str, str], ratios: list[float] = (0.2, 0.5),
        budget_s: float = 1e9, device: str = "auto") -> list[dict]:
    """Prune every candidate of every cell; write `study.json` after each cell."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from slimflow import allocation
    from slimflow.adapters import get_adapter
    from slimflow.api import _fixed_shape_plans, layer_shapes
    from slimflow.method_options import slimgpt
    from slimflow.methods import get_method
    from slimflow.models import load_model
    from slimflow.pipeline import prune_layers
    from slimflow.surgery import count_parameters

    started = time.perf_counter()
    dev, tensors = open_grid_data(data, device)
    eval_ids = tensors.pop("eval")
    tensors.pop("holdout", None)
    val = {k: v.long() for k, v in load_file(books).items()}
    with safe_open(books, "pt") as f:
        names = json.loads(f.metadata()["names"])
    dense, rows, sampled = {}, [], {}
    for name, path in models.items():
        model = load_model(path, dtype="float32", device="cpu").to(dev).eval()
        dense[name] = {"model": model, "params": count_parameters(model)}
        dense[name] |= measure(model, eval_ids, val, dev)
        print(f"{name}: dense {dense[name]['ppl']:.2f}", flush=True)
    header = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "books": names, "dense": {k: {x: v[x] for x in ("ppl", "book512", "book128", "params")}
                                        for k, v in dense.items()}}
    method = get_method(slimgpt())
    todo = study_cells(list(dense), ratios)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(todo):
        if time.perf_counter() - started > budget_s:
            print(f"budget reached: {len(todo) - i} cells not run", flush=True)
            break
        base = dense[cell["model"]]
        model = base["model"]
        calibration = _calibration(cell, tensors, base, sampled, dev, "final")
        adapter = get_adapter(model)
        t = time.perf_counter()
        shapes = layer_shapes(model, adapter)
        target = cell["ratio"] * base["params"]
        train_rows, held_rows = allocation.search_rows(calibration.shape[0])
        measured = calibration[[r for r in range(calibration.shape[0]) if r not in set(held_rows)]]  # as the engine
        gradients = allocation.residual_gradient_energy(model, adapter, measured, 16)
        heads, channels, energies = allocation.measure_cost_curves(model, adapter, measured, shapes, 1, None, dev,
                                                                   16, progress=False)
        fixed = _fixed_shape_plans(model, cell["ratio"], base["params"], None, 1)
        candidates = allocation.candidate_plans(heads, channels, energies, gradients, shapes, target, "gradient",
                                                fixed, 1, None, allocation.ALL_FAMILIES)
        row = dict(cell, curves_s=round(time.perf_counter() - t, 2), candidates={})
        for name, plans in candidates.items():
            trial = copy.deepcopy(model)
            prune_layers(trial, adapter, calibration[train_rows], plans, method, dev, 16, progress=False)
            search = sequence_losses(trial, calibration[held_rows], dev)
            del trial
            pruned = copy.deepcopy(model)
            prune_layers(pruned, adapter, calibration, plans, method, dev, 16, progress=False)
            got = measure(pruned, eval_ids, val, dev)
            got |= {"search": search, "removed": round(1 - count_parameters(pruned) / base["params"], 5),
                    "widths": [(p.remove_units, p.remove_channels) for p in plans]}
            del pruned
            row["candidates"][name] = got
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        chosen = min(("cost:gradient", "cost:residual", *fixed),
                     key=lambda k: sum(row["candidates"][k]["search"]))
        print(json.dumps({k: cell[k] for k in ("model", "ratio", "sampling", "generated", "seed")}
                         | {"default": chosen, "ppl": {k: round(v["ppl"], 1) for k, v in row["candidates"].items()},
                            "s": row["seconds"]}), flush=True)
        (outdir / "study.json").write_text(json.dumps(header | {"rows": rows}))
    return rows


def measure(model, eval_ids: torch.Tensor, val: dict, dev) -> dict:
    """Protocol perplexity and the per-book mean losses at 512 and 128 tokens of context."""
    return {"ppl": _perplexity(model, eval_ids, WINDOWS, dev),
            "book512": book_summary(sequence_losses(model, val["windows"], dev), val["book"]),
            "book128": book_summary(sequence_losses(model, val["windows"], dev, context=128), val["book"])}


def geo_ppl(book_losses: list[float]) -> float:
    """Perplexity with every book weighed the same: exp of the mean per-book loss."""
    return math.exp(sum(book_losses) / len(book_losses))



def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-row differences a − b."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


FIXED = ("uniform", "log_increase:2", "log_increase:4", "log_increase:8")


def select(row: dict, rule: str) -> str:
    """The candidate a selection rule keeps, from the search's per-row held-out losses alone.

    `min:<families>`: least mean loss among the families (comma-separated: cost, fixed, split, blend);
    `se<k>:<families>`: the best fixed shape unless another candidate beats it by more than k paired standard
    errors."""
    kind, families = rule.split(":", 1)
    fams = families.split(",")
    names = [n for n in row["candidates"]
             if ("fixed" in fams and n in FIXED) or any(n.startswith(f + ":") for f in fams if f != "fixed")]
    loss = {n: row["candidates"][n]["search"] for n in names}
    best = min(names, key=lambda n: sum(loss[n]))
    if kind == "min":
        return best
    k = float(kind[2:])
    prior = min((n for n in names if n in FIXED), key=lambda n: sum(loss[n]))
    mean, se = _paired(loss[best], loss[prior])
    return best if mean < -k * se else prior


def analyze(*, studies: list[str], rules: list[str] = ("min:cost,fixed", "min:cost,fixed,split,blend",
            "min:fixed,split", "min:fixed,blend", "se1:cost,fixed", "se2:cost,fixed", "se2:cost,fixed,split,blend"),
            context: str = "book128") -> None:
    """Per rule: the validation-book perplexity (books weighed alike) of the kept candidate against the best of
    uniform / log_increase, summed over cells, and the protocol perplexity it would report."""
    rows = [r for path in studies for r in json.loads(Path(path).read_text())["rows"]]
    print(f"{len(rows)} cells; validation: {context}")
    oracle = "oracle"
    for rule in (*rules, oracle):
        wins, logs, eval_logs, lines = 0, 0.0, 0.0, []
        for r in rows:
            c = r["candidates"]
            val = {n: geo_ppl(v[context]) for n, v in c.items()}
            pick = min(val, key=val.get) if rule == oracle else select(r, rule)
            base = min(("uniform", "log_increase:4"), key=lambda n: val[n])
            base_eval = min(c["uniform"]["ppl"], c["log_increase:4"]["ppl"])
            wins += val[pick] < val[base]
            logs += math.log(val[pick] / val[base])
            eval_logs += math.log(c[pick]["ppl"] / base_eval)
            lines.append(f"{r['model'][:9]} {r['ratio']} {r['sampling'][:4]} g{r['generated']} s{r['seed']}: "
                         f"{pick} val {val[pick]:.1f} vs {val[base]:.1f}, eval {c[pick]['ppl']:.1f} vs {base_eval:.1f}")
        print(f"{rule:32s} better on validation in {wins}/{len(rows)}; mean log ratio val {logs / len(rows):+.4f}, "
              f"eval {eval_logs / len(rows):+.4f}")
        if rule in (rules[0], oracle):
            print("   " + "\n   ".join(lines))


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli([prepare, run, analyze])
