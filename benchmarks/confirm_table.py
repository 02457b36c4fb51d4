"""Tables of the adaptive search with and without its confirmation, from quality_grid JSON files (plan `defaults`:
uniform, log_increase at spread 2 and 4, `adaptive` and `adaptive-confirm1` on the same tensors).

    python -m benchmarks.confirm_table benchmarks/results/confirm_m27.json benchmarks/results/confirm_gqa.json
    python -m benchmarks.confirm_table replay benchmarks/results/candidates_*.json

Per model × ratio × calibration cell: mean ± std over seeds of the evaluation-text perplexity, in brackets the
seeds better than both fixed shapes (uniform and log_increase at its default spread 4, as the tables before; the
grid's log_increase at spread 2 is shown beside them);
then, over all paired runs, the mean change against the better fixed shape on the evaluation text and the books.
A file of earlier rows (`--before`) supplies the search without confirmation where a file lacks that row.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

FIXED = ("uniform", "log_increase:4.0")  # the two fixed shapes at their defaults (spread 4)


def _name(row: dict) -> str | None:
    if row.get("error") or "ppl" not in row:
        return None
    if row["schedule"] == "adaptive":
        return "confirm1" if row["options"].get("confirm") == 1 else "adaptive"
    return "uniform" if row["schedule"] == "uniform" else f"{row['schedule']}:{row['spread']}"


def runs(paths: list[str], before: str | None = None) -> dict:
    """(model, ratio, sampling, seed) → name → row, for the rows of the default groups."""
    out: dict = defaultdict(dict)
    for path in paths:
        for row in json.load(open(path))["rows"]:
            if row["group"] in ("main", "seeds") and (name := _name(row)):
                out[(row["model"], row["ratio"], row["sampling"], row["seed"])][name] = row
    if before:
        for row in json.load(open(before))["rows"]:
            key = (row["model"], row["ratio"], row["sampling"], row["seed"])
            if key in out and row["group"] in ("main", "seeds") and _name(row) == "adaptive":
                out[key].setdefault("confirm1", row)
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(paths: list[str], before: str | None = None) -> str:
    by_run = runs(paths, before)
    cells: dict = defaultdict(list)
    for key, rows in sorted(by_run.items()):
        cells[key[:3]].append(rows)
    lines = ["| model | ratio | calibration | seeds | uniform | log_increase | log_increase, spread 2 | search's best | "
             "**confirmed (default)** | vs the better fixed shape | plans kept (search → confirmed) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    paired = {"confirm1": [], "adaptive": []}
    books = {"confirm1": [], "adaptive": []}
    for (model, ratio, sampling), seeds in cells.items():
        seeds = [s for s in seeds if all(k in s for k in FIXED)]
        if not seeds:
            continue
        col = {k: [s[k]["ppl"] for s in seeds if k in s] for k in ("uniform", "confirm1", "adaptive")}
        logs = [s["log_increase:4.0"]["ppl"] for s in seeds]
        logs2 = [s["log_increase:2.0"]["ppl"] for s in seeds if "log_increase:2.0" in s]
        wins, rel = {}, {}
        for k in ("confirm1", "adaptive"):
            good = [s for s in seeds if k in s]
            best_fixed = [min(s[f]["ppl"] for f in FIXED) for s in good]
            wins[k] = sum(s[k]["ppl"] < b for s, b in zip(good, best_fixed))
            rel[k] = [s[k]["ppl"] / b - 1 for s, b in zip(good, best_fixed)]
            paired[k] += rel[k]
            books[k] += [s[k]["books128"] / min(s[f]["books128"] for f in FIXED) - 1 for s in good
                         if "books128" in s[k]]
        kept = ", ".join(f"{s['confirm1']['search']['chosen'] if 'confirm1' in s else '?'} → "
                         f"{s['adaptive']['search']['chosen']}" for s in seeds if "adaptive" in s)
        n1, n2 = len(col["confirm1"]), len(col["adaptive"])
        lines.append(f"| {model} | {ratio:.0%} | {sampling} | {','.join(str(s['uniform']['seed']) for s in seeds)} "
                     f"| {_fmt(col['uniform'])} | {_fmt(logs)} | {_fmt(logs2)} | {_fmt(col['confirm1'])} ({wins['confirm1']}/{n1}) "
                     f"| **{_fmt(col['adaptive'])}** ({wins['adaptive']}/{n2}) "
                     f"| {statistics.mean(rel['adaptive']) if rel['adaptive'] else float('nan'):+.1%} | {kept} |")
    lines.append("")
    lines.append("| over all paired runs | runs | evaluation text vs the better fixed shape | runs better than both | "
                 "books at 128 tokens |")
    lines.append("|---|---:|---:|---:|---:|")
    for k, label in (("confirm1", "search's best (before)"), ("adaptive", "confirmed (default)")):
        if paired[k]:
            lines.append(f"| {label} | {len(paired[k])} | {statistics.mean(paired[k]):+.2%} | "
                         f"{sum(x < 0 for x in paired[k])}/{len(paired[k])} | "
                         f"{statistics.mean(books[k]) if books[k] else float('nan'):+.2%} |")
    return "\n".join(lines)


def replay(paths: list[str]) -> str:
    """The confirmation replayed on the candidate study (`candidate_study.py`: every candidate pruned on the
    search's rows and on every row, each scored on 32 held-out windows of part-007 and the evaluation text):
    rank by the search's prunes on the windows, keep the best final prune on the windows among the first k (or
    among the first of each family)."""
    from slimflow.allocation import _finalists

    lines = ["| run | uniform | k = 1 (search's best) | k = 2 | k = 3 | every candidate | families | "
             "best final prune |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        rows = json.load(open(path))["rows"]
        by_search = sorted(rows, key=lambda r: r["search_holdout"])
        picks = []
        for k in (1, 2, 3, len(rows)):
            pick = min(by_search[:k], key=lambda r: r["final_holdout"])
            picks.append(f"{pick['final_eval']:.1f} ({pick['plan']})")
        named = {r["plan"]: r for r in by_search}
        pick = min((named[n] for n in _finalists(list(named), "families")), key=lambda r: r["final_holdout"])
        picks.append(f"{pick['final_eval']:.1f} ({pick['plan']})")
        uniform = next(r["final_eval"] for r in rows if r["plan"] == "uniform")
        oracle = min(rows, key=lambda r: r["final_eval"])
        name = path.rsplit("candidates_", 1)[-1].removesuffix(".json")
        lines.append(f"| {name} | {uniform:.1f} | " + " | ".join(picks) +
                     f" | {oracle['final_eval']:.1f} ({oracle['plan']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "replay":
        print(replay(args[1:]))
        sys.exit(0)
    before = None
    if "--before" in args:
        i = args.index("--before")
        before = args[i + 1]
        args = args[:i] + args[i + 2:]
    print(table(args, before))
