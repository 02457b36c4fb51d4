"""Quality grid of the per-layer allocations: model × ratio × schedule × calibration sampling, seeds, ablations.

Protocol (docs/results.md §1): calibration from part-007 of `../shared/pretrain_corpus` — `tail` takes the last
n × L tokens, `random` draws seeded windows after the first 400,000 tokens (`skip_tokens=400000`, so they never
overlap the evaluation text); perplexity on the first 300 non-overlapping windows of 128 tokens of the first
400,000 tokens of part-007. Two steps, so the device needs neither the corpus nor a tokenizer pass:

    python -m benchmarks.quality_grid prepare --out runs/grid_data.safetensors --tokenizer ../shared/models/ref-llama-27m
    python -m benchmarks.quality_grid run --data runs/grid_data.safetensors --out runs/grid \
        --models '{"ref-llama-27m": "../shared/models/ref-llama-27m"}'

`prepare` tokenises with slimflow's own `calibration_ids` / `tokenize_texts` (the exact tensors `slimflow prune`
and `slimflow eval` would use); `run` prunes a fresh copy of each model per cell with `slimflow.prune` and writes
`grid.json` and `grid.md` after every cell (a run cut short keeps what it finished). Cells run in priority
order: the main table, then seeds, ablations and variants; `budget_s` stops starting new cells after that time.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from slimflow.method_options import slimgpt

CORPUS = "../shared/pretrain_corpus/part-007.txt.gz"
EVAL_TOKENS, WINDOW, WINDOWS, SKIP = 400_000, 128, 300, 400_000
SCHEDULES = ("uniform", "log_increase", "adaptive", "adaptive-residual")
VARIANTS = {"adaptive-residual": ("adaptive", {"normalize": "residual"}), "adaptive-none": ("adaptive", {"normalize": "none"}),
            "adaptive-confirm1": ("adaptive", {"confirm": 1, "confirm_families": False}),
            "adaptive-families": ("adaptive", {"confirm": "families"}),
            "adaptive-two": ("adaptive", {"confirm": 2, "confirm_families": False})}


def calibration_key(sampling: str, num_samples: int, seqlen: int, seed: int) -> str:
    return f"{sampling}-{num_samples}x{seqlen}-s{seed}"


def needed_calibration(seeds=(0, 1, 2)) -> list[tuple[str, int, int, int]]:
    keys = [("tail", 128, 512, 0)] + [("random", 128, 512, s) for s in seeds]
    keys += [("random", n, 512, 0) for n in (32, 512)] + [("random", 128, L, 0) for L in (128, 2048)]
    return keys


def prepare(*, out: str, tokenizer: str = "../shared/models/ref-llama-27m", corpus: str = CORPUS,
            small: bool = False) -> None:
    """Tokenise the evaluation text and every calibration set of the grid into one safetensors file.

    Args:
        out: output file.
        tokenizer: model directory whose tokenizer all grid models share.
        corpus: held-out text (part-007).
        small: CPU development sizes (at most 32 × 128 calibration tokens per cell).
    """
    from safetensors.torch import save_file

    from slimflow.data.calibration import calibration_ids
    from slimflow.data.text import read_local_texts
    from slimflow.evaluation.perplexity import tokenize_texts
    from slimflow.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    tensors = {"eval": tokenize_texts(tok, read_local_texts(corpus))[:EVAL_TOKENS].clone()}
    # scoring windows for schedule choices: after the evaluation text, like `random` calibration (other seed)
    tensors["holdout"] = calibration_ids(corpus, tok, 32, 512, seed=99, sampling="random", skip_tokens=SKIP)
    for sampling, n, length, seed in needed_calibration():
        n_, length_ = (min(n, 32), min(length, 128)) if small else (n, length)
        ids = calibration_ids(corpus, tok, n_, length_, seed=seed, sampling=sampling,
                              skip_tokens=SKIP if sampling == "random" else 0)
        tensors[calibration_key(sampling, n, length, seed)] = ids.to(torch.int32).contiguous()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.int16 if int(v.max()) < 2**15 else torch.int32).contiguous() for k, v in tensors.items()}, out)
    print({k: tuple(v.shape) for k, v in tensors.items()})


def scoring_key(calibration: str, seed: int) -> str:
    """The scoring windows of a cell: its calibration tensor's key and the cell's seed (the tail is one text
    for every seed, its scoring windows are not)."""
    return f"score:{calibration}:{seed}"


def prepare_scoring(*, out: str, data: str, tokenizer: str = "../shared/models/ref-llama-27m",
                    corpus: str = CORPUS, windows: int | None = None, only: list[str] | None = None) -> None:
    """The adaptive search's scoring windows for every calibration set of `data` (written by `prepare`) and
    seeds 0-2: what `slimflow prune --calibration <corpus> --skip-tokens 400000 --seed <s>` draws with
    `slimflow.data.calibration.scoring_ids` (random windows after token 400,000 that overlap no calibration
    row, so never the evaluation text). `windows`: per set (default `slimflow.api.scoring_windows` of its length,
    as `slimflow prune`); `only`: just these calibration keys (e.g. `["tail-128x512-s0"]`)."""
    from safetensors.torch import load_file, save_file

    from slimflow.api import scoring_windows
    from slimflow.data.calibration import scoring_ids
    from slimflow.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    tensors = {}
    for key, ids in load_file(data).items():
        if key in ("eval", "holdout") or (only is not None and key not in only):
            continue
        seeds = (0, 1, 2) if key.startswith("tail") else (int(key.rsplit("-s", 1)[1]),)
        for seed in seeds:
            count = windows or scoring_windows(ids.shape[1])
            found = scoring_ids(corpus, tok, count, ids.shape[1], seed, SKIP, avoid=ids.long())
            tensors[scoring_key(key, seed)] = found.to(torch.int16 if int(found.max()) < 2**15 else torch.int32)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    print({k: tuple(v.shape) for k, v in tensors.items()})


def drift_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """Drift correction against none, for every schedule shape, model, ratio and sampling; then seeds."""
    out = []
    for model in models:
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                for schedule, spread in (("uniform", 4.0), ("log_increase", 2.0), ("log_increase", 4.0),
                                         ("log_increase", 8.0), ("adaptive", 4.0)):
                    for drift in (False, True):
                        out.append(dict(group="drift", model=model, ratio=ratio, schedule=schedule, spread=spread,
                                        sampling=sampling, drift=drift))
    for seed in (1, 2):
        for model in models:
            for ratio in (0.2, 0.5):
                for schedule in ("uniform", "log_increase", "adaptive"):
                    for drift in (False, True):
                        out.append(dict(group="seeds", model=model, ratio=ratio, schedule=schedule,
                                        sampling="random", seed=seed, drift=drift))
    return _defaults(out)


def search_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """The adaptive schedule (cost curves + search over allocations scored on held-out calibration sequences)
    against uniform, log_increase and the cost plan alone; seeds; the search's own settings on `reference`."""
    shapes = (("uniform", {}), ("log_increase", {}), ("adaptive", {}), ("adaptive", {"search": False}),
              ("adaptive", {"score": "loss"}))
    out = []
    for model in models:
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                for schedule, options in shapes:
                    out.append(dict(group="main", model=model, ratio=ratio, schedule=schedule, sampling=sampling,
                                    options=options))
    for seed in (1, 2):
        for model in models:
            for ratio in (0.2, 0.5):
                for schedule, options in shapes[:3]:
                    out.append(dict(group="seeds", model=model, ratio=ratio, schedule=schedule, sampling="random",
                                    seed=seed, options=options))
    if reference in models:
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                out.append(dict(group="ablations", model=reference, ratio=ratio, schedule="adaptive",
                                sampling=sampling, options={"search_samples": 64, "holdout": 32}))
    return _defaults(out)


def generated_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """Where the calibration text is narrow (`tail`: one book's ending): damping, sequences sampled from the
    dense model (alone, or added to the real ones) and the search scored on sampled sequences, against the
    fixed shapes and the adaptive default."""
    fixed = (("uniform", 1.0), ("log_increase", 2.0), ("log_increase", 4.0), ("log_increase", 8.0))
    out = []
    for model in models:
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                base = dict(group="main", model=model, ratio=ratio, sampling=sampling)
                for schedule, spread in fixed:  # the shapes with real data, then real + 128 sampled
                    out.append(base | dict(schedule=schedule, spread=spread))
                    out.append(base | dict(schedule=schedule, spread=spread, generated=128))
                out.append(base | dict(schedule="adaptive"))
                out.append(base | dict(schedule="adaptive", options={"score_on": "generated"}))
                out.append(base | dict(schedule="adaptive", generated=128))
                out.append(base | dict(schedule="adaptive", generated=128, options={"score_on": "generated"}))
                for damp in (0.1, 1.0):
                    out.append(base | dict(group="damp", schedule="log_increase", spread=2.0, damp=damp))
                    out.append(base | dict(group="damp", schedule="uniform", spread=1.0, damp=damp))
                for spread in (2.0, 4.0):
                    out.append(base | dict(group="mix", schedule="log_increase", spread=spread, generated=64, real=64))
                    out.append(base | dict(group="mix", schedule="log_increase", spread=spread, generated=128,
                                           gen_temperature=0.8))
            for schedule, spread in fixed:  # sampled sequences only: no calibration text at all
                out.append(dict(group="main", model=model, ratio=ratio, sampling="none", schedule=schedule,
                                spread=spread, generated=128, real=0))
            out.append(dict(group="main", model=model, ratio=ratio, sampling="none", schedule="adaptive",
                            generated=128, real=0))
    for seed in (1, 2):
        for model in models:
            for ratio in (0.2, 0.5):
                for sampling in ("tail", "random"):
                    base = dict(group="seeds", model=model, ratio=ratio, sampling=sampling, seed=seed)
                    out.append(base | dict(schedule="adaptive"))
                    out.append(base | dict(schedule="adaptive", generated=128, options={"score_on": "generated"}))
                    out.append(base | dict(schedule="adaptive", options={"score_on": "generated"}))
                    out.append(base | dict(schedule="log_increase", spread=2.0, generated=128))
                    out.append(base | dict(schedule="log_increase", spread=4.0, generated=128))
    return _defaults(out)


def generated2_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """How many sampled sequences to add (`slimflow.prune(generated_samples=...)`), against the fixed shapes and
    the adaptive schedule (its search rows spread over the set); seeds of the middle setting."""
    shapes = (("uniform", 1.0), ("log_increase", 2.0), ("log_increase", 4.0), ("log_increase", 8.0),
              ("adaptive", 4.0))
    out = []
    for model in models:
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                out.append(dict(group="main", model=model, ratio=ratio, sampling=sampling, schedule="adaptive"))
                for generated in (128, 256, 384):
                    for schedule, spread in shapes:
                        out.append(dict(group="main", model=model, ratio=ratio, sampling=sampling,
                                        schedule=schedule, spread=spread, generated=generated))
            for schedule, spread in shapes:
                out.append(dict(group="main", model=model, ratio=ratio, sampling="none", schedule=schedule,
                                spread=spread, generated=256, real=0))
    for seed in (1, 2):
        for model in models:
            for ratio in (0.2, 0.5):
                for sampling in ("tail", "random"):
                    for schedule, spread in (shapes[0], shapes[1], shapes[2], shapes[4]):
                        out.append(dict(group="seeds", model=model, ratio=ratio, sampling=sampling, seed=seed,
                                        schedule=schedule, spread=spread, generated=256))
    return _defaults(out)


def final_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """The comparison on every model: uniform, log_increase and adaptive, with the calibration text alone and
    with 256 sampled sequences added; seeds 1-2 of both samplings."""
    plain = (("uniform", 1.0), ("log_increase", 4.0), ("adaptive", 4.0))
    sampled = (("uniform", 1.0), ("log_increase", 2.0), ("log_increase", 4.0), ("adaptive", 4.0))
    out = []
    for seed in (0, 1, 2):
        group = "main" if seed == 0 else "seeds"
        for model in models:
            for ratio in (0.2, 0.5):
                for sampling in ("tail", "random"):
                    base = dict(group=group, model=model, ratio=ratio, sampling=sampling, seed=seed)
                    if seed == 0 or sampling == "random":
                        out += [base | dict(schedule=s, spread=k) for s, k in plain]
                    out += [base | dict(schedule=s, spread=k, generated=256) for s, k in sampled]
    return _defaults(out)


def _seed_runs(models: list[str]):
    """The base cell of every seed (0-2) × model × ratio × calibration sampling, 256 sampled sequences added."""
    for seed in (0, 1, 2):
        for model in models:
            for ratio in (0.2, 0.5):
                for sampling in ("tail", "random"):
                    yield dict(group="main" if seed == 0 else "seeds", model=model, ratio=ratio,
                               sampling=sampling, seed=seed, generated=256)


def defaults_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """The default adaptive run (256 sampled sequences added) against uniform and log_increase with the same
    sequences, seeds 0-2 of both samplings (and the search's own best, without the confirmation of its two best
    candidates pruned on every row: the default before it); then, seed 0 only, the calibration text alone."""
    sampled = (("uniform", 1.0), ("log_increase", 2.0), ("log_increase", 4.0), ("adaptive", 4.0),
               ("adaptive-confirm1", 4.0))
    plain = (("uniform", 1.0), ("log_increase", 4.0), ("adaptive", 4.0))
    out = [base | dict(schedule=s, spread=k) for base in _seed_runs(models) for s, k in sampled]
    for model in models:
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                base = dict(group="plain", model=model, ratio=ratio, sampling=sampling, seed=0)
                out += [base | dict(schedule=s, spread=k) for s, k in plain]
    return _defaults(out)


def families_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """The search confirming the best candidate of each family (`{"confirm": "families"}`) against confirming its
    two best (the default before `confirm_families`), 256 sampled sequences added, seeds 0-2 of both samplings;
    their union (the default) is the better of the two rows by the confirmed scores (`families_table`). On
    `reference` only the families rows: its fixed-shape and two-best rows repeat those of
    benchmarks/results/confirm_m27.json, which one two-best row (group `check`) verifies; and the 512-sequence
    ablation at 20% (group `ablation:n512`). On the other models uniform, log_increase and both rules."""
    from slimflow.api import default_generated_samples

    full = (("uniform", 1.0), ("log_increase", 4.0), ("adaptive-two", 4.0), ("adaptive-families", 4.0))
    out = [base | dict(schedule=s, spread=k) for base in _seed_runs(models)
           for s, k in (full[3:] if base["model"] == reference else full)]
    if reference in models:
        base = dict(model=reference, sampling="random", generated=256, spread=4.0)
        out.append(base | dict(group="check", ratio=0.5, seed=1, schedule="adaptive-two"))
        out.append(base | dict(group="ablation:n512", ratio=0.2, seed=0, num_samples=512,
                               generated=default_generated_samples("adaptive", False, 512),
                               schedule="adaptive-families"))
    return _defaults(out)


ABLATIONS = {"default": {}, "damp0.001": {"damp": 0.001}, "damp0.1": {"damp": 0.1}, "n32": {"num_samples": 32},
             "n512": {"num_samples": 512}, "L128": {"seqlen": 128}, "L2048": {"seqlen": 2048}}


def ablation_cells(models: list[str], reference: str = "ref-llama-27m") -> list[dict]:
    """Ablations of the current default on `reference`: the adaptive run with the sequences it samples by
    default (`slimflow.api.default_generated_samples` for the cell's length) and, on the same tensors,
    uniform and log_increase; one setting changed at a time (`ABLATIONS`; group `ablation:<name>`), random
    calibration, seed 0, both ratios."""
    from slimflow.api import default_generated_samples

    out = []
    for name, change in ABLATIONS.items():
        for ratio in (0.2, 0.5):
            base = dict(group=f"ablation:{name}", model=reference, ratio=ratio, sampling="random", seed=0) | change
            sampled = default_generated_samples("adaptive", False, change.get("seqlen", 512))
            out += [base | dict(schedule=s, spread=k, generated=sampled)
                    for s, k in (("uniform", 1.0), ("log_increase", 4.0), ("adaptive", 4.0))]
    return _defaults(out)


def _defaults(out: list[dict]) -> list[dict]:
    for c in out:
        if c["schedule"] in VARIANTS:
            c["schedule"], c["options"] = VARIANTS[c["schedule"]]
        c.setdefault("seed", 0)
        c.setdefault("num_samples", 128)
        c.setdefault("seqlen", 512)
        c.setdefault("damp", 0.01)
        c.setdefault("options", {})
        c.setdefault("spread", 4.0)
        c.setdefault("drift", False)
        c.setdefault("generated", 0)
        c.setdefault("real", None)
        c.setdefault("gen_temperature", 1.0)
    return out


def cells(models: list[str], reference: str = "ref-llama-27m", gqa: str | None = None) -> list[dict]:
    """Every cell, in the order they run: the main table for every model, then on `reference` the losing
    adaptive variant, seeds and ablations; the GQA stress cell on `gqa`."""
    out = []
    for model in models:  # the main table: every model, both ratios, both samplings, three schedules
        for ratio in (0.2, 0.5):
            for sampling in ("tail", "random"):
                for schedule in SCHEDULES:
                    out.append(dict(group="main", model=model, ratio=ratio, schedule=schedule, sampling=sampling))
                if model == reference:  # adaptive with raw (unnormalised) errors
                    out.append(dict(group="variants", model=model, ratio=ratio, schedule="adaptive-none",
                                    sampling=sampling))
    if gqa in models:
        out.append(dict(group="variants", model=gqa, ratio=0.65, schedule="adaptive", sampling="random"))
        out.append(dict(group="variants", model=gqa, ratio=0.65, schedule="log_increase", sampling="random"))
    if reference in models:
        for seed in (1, 2):  # seed spread of random calibration
            for ratio in (0.2, 0.5):
                for schedule in SCHEDULES:
                    out.append(dict(group="seeds", model=reference, ratio=ratio, schedule=schedule,
                                    sampling="random", seed=seed))
        for ratio in (0.2, 0.5):  # ablations of the default (adaptive, random calibration)
            for damp in (0.001, 0.1):
                out.append(dict(group="ablations", model=reference, ratio=ratio, schedule="adaptive",
                                sampling="random", damp=damp))
            for n in (32, 512):
                out.append(dict(group="ablations", model=reference, ratio=ratio, schedule="adaptive",
                                sampling="random", num_samples=n))
            for length in (128, 2048):
                out.append(dict(group="ablations", model=reference, ratio=ratio, schedule="adaptive",
                                sampling="random", seqlen=length))
    return _defaults(out)


def _calibration(cell: dict, tensors: dict, dense: dict, sampled: dict, dev, plan: str) -> torch.Tensor:
    """The cell's calibration tensor: its first `real` real sequences (all by default; `sampling="none"`: none),
    then `generated` sequences sampled from the dense model (cached per model, count, length, temperature)."""
    parts = []
    if cell["sampling"] != "none" and cell["real"] != 0:
        seed = 0 if cell["sampling"] == "tail" else cell["seed"]  # the tail is one text: the seed changes the samples
        ids = tensors[calibration_key(cell["sampling"], cell["num_samples"], cell["seqlen"], seed)]
        parts.append(ids[: cell["real"]] if cell["real"] else ids)
    if cell["generated"]:
        from slimflow.data.generated import sample_sequences
        length = parts[0].shape[1] if parts else cell["seqlen"]
        key = (cell["model"], cell["generated"], length, cell["gen_temperature"], cell["seed"])
        if key not in sampled:
            t = time.perf_counter()
            sampled[key] = sample_sequences(dense["model"], cell["generated"], length, seed=cell["seed"],
                                            temperature=cell["gen_temperature"], device=dev,
                                            **({"batch_size": 128} if plan == "generated" else {}))
            print(f"sampled {key} in {time.perf_counter() - t:.1f} s", flush=True)
        parts.append(sampled[key])
    return torch.cat(parts) if parts else torch.empty(0, cell["seqlen"], dtype=torch.long)


def open_grid_data(data: str, device: str = "auto") -> tuple[torch.device, dict[str, torch.Tensor]]:
    """The device the grid runs on (auto: CUDA if present; TF32 off) and the tensors `prepare` wrote."""
    from safetensors.torch import load_file

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.backends.cuda.matmul.allow_tf32 = False
    return dev, {k: v.long() for k, v in load_file(data).items()}


def _book_ppl(model, val: dict, device) -> dict:
    """Perplexity on the validation books, every book weighed alike, at 128 and 512 tokens of context."""
    from benchmarks.allocation_study import book_summary, geo_ppl, sequence_losses

    return {f"books{c}": geo_ppl(book_summary(sequence_losses(model, val["windows"], device,
                                                              context=None if c == 512 else c), val["book"]))
            for c in (128, 512)}


def _perplexity(model, ids: torch.Tensor, windows: int, device) -> float:
    from slimflow.evaluation.perplexity import perplexity_of_ids

    return perplexity_of_ids(model, ids, WINDOW, batch_size=32, max_windows=windows, device=device,
                             progress=False)[0]


def run(*, data: str, out: str, models: dict[str, str], device: str = "auto", budget_s: float = 1e9,
        windows: int = WINDOWS, groups: list[str] | None = None, reference: str = "ref-llama-27m",
        gqa: str | None = None, plan: str = "default", ratios: list[float] | None = None,
        seeds: list[int] | None = None, books: str | None = None, write_markdown: bool = True,
        scoring: str | None = None, samplings: list[str] | None = None) -> list[dict]:
    """Run the grid; `models` maps a short name to a model directory.

    Args:
        data: file written by `prepare`.
        out: output directory (grid.json, grid.md).
        models: name → model directory, the reference model first.
        device: where pruning and evaluation run (auto: CUDA if present).
        budget_s: start no new cell after this many seconds.
        windows: evaluation windows of 128 tokens.
        groups: cell groups to run (default all: main, seeds, variants, ablations).
        reference: name of the model that also gets seeds, ablations and the adaptive variant.
        gqa: name of the GQA model for the 65% stress cells (70% is beyond its floors).
        plan: `default` (schedules, seeds, ablations), `drift` (drift correction against none) or `search` (the
            adaptive schedule with its search against the fixed shapes), `generated` / `generated2` / `final`
            (sequences sampled from the model added to the calibration set), `defaults` (the default adaptive
            run against the fixed shapes, seeds 0-2), `ablations` (one setting of the default changed at a time),
            `families` (the search confirming the best of each family against the default).
        ratios: run only the cells of these ratios (default all).
        seeds: run only the cells of these seeds (default all).
        samplings: run only the cells of these calibration samplings (default all).
        books: validation windows per book (`allocation_study prepare`); each row then also records the perplexity
            on them, every book weighed alike, with 128 and 512 tokens of context (`books128`, `books512`).
        write_markdown: also write grid.md beside grid.json (off where a transfer counts files).
        scoring: the adaptive search's scoring windows (`prepare_scoring`), passed to `slimflow.prune(scoring=...)`
            for the cells of real calibration text, as `slimflow prune` draws them; None: the search holds out
            calibration rows (what the grids before these windows did).
    """
    from safetensors.torch import load_file

    import slimflow
    from slimflow.models import load_model

    started = time.perf_counter()
    dev, tensors = open_grid_data(data, device)
    eval_ids = tensors.pop("eval")
    holdout = tensors.pop("holdout", None)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    val = {k: v.long() for k, v in load_file(books).items()} if books else None
    windows_of = {k: v.long() for k, v in load_file(scoring).items()} if scoring else {}
    dense, rows = {}, []
    for name, path in models.items():
        if not Path(path).is_dir():
            print(f"skipping {name}: {path} not found")
            continue
        model = load_model(path, dtype="float32", device="cpu").to(dev).eval()
        dense[name] = {"model": model, "ppl": _perplexity(model, eval_ids, windows, dev), "path": path,
                       "params": sum(p.numel() for p in model.parameters())}
        if val is not None:
            dense[name] |= _book_ppl(model, val, dev)
        print(f"{name}: dense ppl {dense[name]['ppl']:.2f}, {dense[name]['params']:,} parameters", flush=True)
    header = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "windows": windows, "window": WINDOW,
              "dense": {k: {x: v[x] for x in ("ppl", "params", "books128", "books512") if x in v}
                        for k, v in dense.items()}}
    planned = {"drift": drift_cells, "search": search_cells, "generated": generated_cells,
               "generated2": generated2_cells, "final": final_cells, "defaults": defaults_cells,
               "ablations": ablation_cells, "families": families_cells}[plan](
        list(dense), reference) if plan != "default" \
        else cells(list(dense), reference, gqa)
    todo = [c for c in planned if c["model"] in dense and (groups is None or c["group"] in groups)
            and (ratios is None or c["ratio"] in ratios) and (seeds is None or c["seed"] in seeds)
            and (samplings is None or c["sampling"] in samplings)]
    sampled: dict = {}
    for i, cell in enumerate(todo):
        if time.perf_counter() - started > budget_s:
            print(f"budget reached: {len(todo) - i} cells not run", flush=True)
            break
        # `generated` and `final` add the sampled sequences here, cached per seed (`final` with the API's batch of
        # 64, so the same tensors as slimflow.prune(generated_samples=...), tests/test_generated.py; `generated`
        # with batches of 128); `generated2` goes through slimflow.prune(generated_samples=...)
        via_api = plan == "generated2"
        calibration = _calibration(cell | ({"generated": 0} if via_api else {}), tensors, dense[cell["model"]],
                                   sampled, dev, plan)
        model = copy.deepcopy(dense[cell["model"]]["model"])
        score_windows = windows_of.get(scoring_key(calibration_key(cell["sampling"], cell["num_samples"],
                                                                   cell["seqlen"], 0 if cell["sampling"] == "tail"
                                                                   else cell["seed"]), cell["seed"]))
        t = time.perf_counter()
        row = dict(cell)
        if score_windows is not None and cell["schedule"] == "adaptive":
            row["scoring_windows"] = int(score_windows.shape[0])
        try:
            report = slimflow.prune(model, calibration, ratio=cell["ratio"], schedule=cell["schedule"],
                                    method=slimgpt(damp=cell["damp"]), device=dev,
                                    progress=False, schedule_options=cell["options"] or None, batch_size=16,
                                    spread=cell["spread"], correct_drift=cell["drift"], scoring=score_windows,
                                    **({"generated_samples": cell["generated"], "seed": cell["seed"]}
                                       if via_api else {"generated_samples": 0}))  # sampled rows are in `calibration`
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row["prune_s"] = round(time.perf_counter() - t, 2)
            row["removed"] = round(report.realised_fraction, 5)
            row["ppl"] = _perplexity(model, eval_ids, windows, dev)
            row["x_dense"] = row["ppl"] / dense[cell["model"]]["ppl"]
            if val is not None:
                row |= _book_ppl(model, val, dev)
            if holdout is not None:
                from slimflow.evaluation.perplexity import perplexity_of_ids
                row["holdout_ppl"] = perplexity_of_ids(model, holdout.reshape(-1), 512, batch_size=32,
                                                       device=dev, progress=False)[0]
            row["widths"] = [(w.num_key_value_heads, w.intermediate_size) for w in report.widths]
            search = report.settings.get("allocation", {}).get("search")
            if search:
                row["search"] = {k: search[k] for k in ("chosen", "score", "scores", "confirmed") if k in search}
            row["times"] = report.phase_times
        except Exception as err:  # recorded in the table: a failing default is a result too
            row["error"] = f"{type(err).__name__}: {err}"
        del model
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
        _write(outdir, header, rows, time.perf_counter() - started, write_markdown)
    return rows


def merge(*, out: str, grids: str, prefix: str) -> None:
    """One file from the `grid.json` of every grid under `grids` whose folder name starts with `prefix`: the
    first one's header (each grid's dense perplexity and elapsed time kept under `parts`), every row."""
    parts = sorted(p for p in Path(grids).glob(f"{prefix}*/grid.json"))
    if not parts:
        print(f"no grid under {grids} starts with {prefix}")
        return
    loaded = [json.loads(p.read_text()) for p in parts]
    merged = {k: v for k, v in loaded[0].items() if k not in ("rows", "elapsed_s")}
    merged["parts"] = {p.parent.name: {"dense": d["dense"], "elapsed_s": d["elapsed_s"], "rows": len(d["rows"])}
                       for p, d in zip(parts, loaded)}
    merged["rows"] = [r for d in loaded for r in d["rows"]]
    Path(out).write_text(json.dumps(merged, indent=1))


def _write(outdir: Path, header: dict, rows: list[dict], elapsed: float, write_markdown: bool = True) -> None:
    (outdir / "grid.json").write_text(json.dumps(header | {"elapsed_s": round(elapsed, 1), "rows": rows}, indent=1))
    if write_markdown:
        (outdir / "grid.md").write_text(markdown(header, rows))


def markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"Device: {header['device']}; perplexity on {header['windows']} windows of {header['window']} tokens",
             "", "| group | model | ratio | schedule | sampling | seed | n × L | damp | options | removed | PPL | × dense "
             "| prune s |", "|---|---|---:|---|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for name, d in header["dense"].items():
        lines.append(f"| dense | {name} | – | – | – | – | – | – | – | – | {d['ppl']:.2f} | 1.000 | – |")
    for r in rows:
        res = (f"{r['removed']:.2%} | {r['ppl']:.2f} | {r['x_dense']:.3f} | {r['prune_s']}" if "ppl" in r
               else f"– | {r['error']} | – | –")
        lines.append(f"| {r['group']} | {r['model']} | {r['ratio']} | {r['schedule']} | {r['sampling']} | {r['seed']} "
                     f"| {r['num_samples']} × {r['seqlen']} | {r['damp']} | {_options(r)} "
                     f"| {res} |")
    spread = _seed_spread(rows)
    if spread:
        lines += ["", "Seed spread (random calibration, seeds 0–2): mean ± sample std of PPL", "",
                  "| model | ratio | schedule | PPL mean | std | seeds |", "|---|---:|---|---:|---:|---:|"]
        lines += [f"| {m} | {r} | {s} | {mu:.2f} | {sd:.2f} | {n} |" for (m, r, s), (mu, sd, n) in spread.items()]
    return "\n".join(lines) + "\n"


def _options(r: dict) -> str:
    extra = dict(r.get("options") or {})
    if r.get("spread", 4.0) != 4.0:
        extra["spread"] = r["spread"]
    if r.get("drift"):
        extra["correct_drift"] = True
    for name, default in (("generated", 0), ("real", None), ("gen_temperature", 1.0)):
        if r.get(name, default) != default:
            extra[name] = r[name]
    return json.dumps(extra) if extra else ""


def _seed_spread(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        if r["sampling"] == "random" and "ppl" in r and r["group"] in ("main", "seeds"):
            groups.setdefault((r["model"], r["ratio"], r["schedule"]), []).append(r["ppl"])
    return {k: (statistics.mean(v), statistics.stdev(v), len(v)) for k, v in groups.items() if len(v) > 1}


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli({"prepare": prepare, "prepare_scoring": prepare_scoring, "run": run})
