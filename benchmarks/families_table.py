"""Tables of three confirmation rules of the adaptive search, from quality_grid JSON files: the two best-scored
candidates pruned again on every row (the default before `confirm_families`), `{"confirm": "families"}` (the best of each family) and their
union (the default, `confirm_families`: the two best and the best of each family).

    python -m benchmarks.families_table benchmarks/results/confirm_m27.json benchmarks/results/families_m27.json
    python -m benchmarks.families_table seeds benchmarks/results/families_gqa_p4.json ...

The union needs no run of its own: every confirmed candidate's score is its prune on every row, the same in both
rows, so the union keeps the better of the two rows' kept plans by those scores, and that row's perplexity is the
union's. Per model × ratio × calibration cell: mean ± std over seeds, in brackets the seeds better than both fixed
shapes (uniform, log_increase at spread 4); then each rule over all paired runs.

`seeds`: every run with both fixed shapes and the two-best row, one line per seed, the union where its families
row ran too (else "–"); then per cell the seed spread of the fixed shapes against the mean margin of the
default (the union, or the two-best row where the union is not measured), so a win can be read against the noise.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

FIXED = ("uniform", "log_increase")
RULES = ("two", "families", "union")


def _name(row: dict) -> str | None:
    if row.get("error") or "ppl" not in row or row["group"] not in ("main", "seeds"):
        return None
    if row["schedule"] == "adaptive":
        if row["options"] in ({}, {"confirm": 2, "confirm_families": False}):  # {}: rows from before the union
            return "two"
        return "families" if row["options"] == {"confirm": "families"} else None
    if row["schedule"] == "log_increase" and row["spread"] != 4.0:
        return None
    return row["schedule"]


def union(two: dict, families: dict) -> dict:
    """The row whose kept plan scores best among both rows' confirmed candidates (ties: the earlier candidate)."""
    order = list(two["search"]["scores"])
    confirmed = two["search"]["confirmed"] | families["search"]["confirmed"]
    for name in set(two["search"]["confirmed"]) & set(families["search"]["confirmed"]):
        assert abs(two["search"]["confirmed"][name] - families["search"]["confirmed"][name]) < 1e-9, name
    best = min(confirmed, key=lambda k: (confirmed[k], order.index(k)))
    return two if two["search"]["chosen"] == best else families


def runs(paths: list[str], complete: bool = True) -> dict:
    """Rows by (model, ratio, sampling, seed), later files replacing earlier ones; `complete`: only the runs that
    have both fixed shapes and every rule (else both fixed shapes and the two-best row)."""
    out: dict = defaultdict(dict)
    for path in paths:
        for row in json.load(open(path))["rows"]:
            if name := _name(row):
                out[(row["model"], row["ratio"], row["sampling"], row["seed"])][name] = row
    for rows in out.values():
        if "two" in rows and "families" in rows:
            rows["union"] = union(rows["two"], rows["families"])
    needed = FIXED + (RULES if complete else ("two",))
    return {k: v for k, v in out.items() if all(n in v for n in needed)}


def _fmt(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(paths: list[str]) -> str:
    cells: dict = defaultdict(list)
    for key, rows in sorted(runs(paths).items()):
        cells[key[:3]].append(rows)
    lines = ["| model | ratio | calibration | seeds | uniform | log_increase | two best (before) | families | "
             "**two best + families (default)** | vs the better fixed shape | plans kept (two best / families / union) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    rel: dict = {r: [] for r in RULES}
    books: dict = {r: [] for r in RULES}
    for (model, ratio, sampling), seeds in cells.items():
        best_fixed = [min(s[f]["ppl"] for f in FIXED) for s in seeds]
        col = {}
        for r in RULES:
            values = [s[r]["ppl"] for s in seeds]
            wins = sum(v < b for v, b in zip(values, best_fixed))
            col[r] = f"{_fmt(values)} ({wins}/{len(seeds)})"
            rel[r] += [v / b - 1 for v, b in zip(values, best_fixed)]
            books[r] += [s[r]["books128"] / min(s[f]["books128"] for f in FIXED) - 1 for s in seeds]
        mine = [s["union"]["ppl"] / b - 1 for s, b in zip(seeds, best_fixed)]
        kept = ", ".join(" / ".join(s[r]["search"]["chosen"] for r in RULES) for s in seeds)
        lines.append(f"| {model} | {ratio:.0%} | {sampling} | {','.join(str(s['uniform']['seed']) for s in seeds)} "
                     f"| {_fmt([s['uniform']['ppl'] for s in seeds])} | {_fmt([s['log_increase']['ppl'] for s in seeds])} "
                     f"| {col['two']} | {col['families']} | **{col['union']}** | {statistics.mean(mine):+.1%} "
                     f"| {kept} |")
    lines += ["", "| over all paired runs | runs | evaluation text vs the better fixed shape | runs better than both | "
              "books at 128 tokens |", "|---|---:|---:|---:|---:|"]
    for r, label in zip(RULES, ("two best (before)", "families", "two best + families (default)")):
        if rel[r]:
            lines.append(f"| {label} | {len(rel[r])} | {statistics.mean(rel[r]):+.2%} | "
                         f"{sum(x < 0 for x in rel[r])}/{len(rel[r])} | {statistics.mean(books[r]):+.2%} |")
    return "\n".join(lines)


def seeds_table(paths: list[str]) -> str:
    lines = ["| model | ratio | calibration | seed | uniform | log_increase | two best | union (default) | "
             "default vs the better fixed shape | plan kept |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    cells: dict = defaultdict(list)
    for (model, ratio, sampling, seed), rows in sorted(runs(paths, complete=False).items()):
        best = min(rows[f]["ppl"] for f in FIXED)
        default = rows.get("union", rows["two"])
        margin = default["ppl"] / best - 1
        cells[(model, ratio, sampling)].append((rows, default["ppl"], margin))
        union = f"{rows['union']['ppl']:.2f}" if "union" in rows else "–"
        mark = "" if "union" in rows else " (two best)"
        lines.append(f"| {model} | {ratio:.0%} | {sampling} | {seed} | {rows['uniform']['ppl']:.2f} | "
                     f"{rows['log_increase']['ppl']:.2f} | {rows['two']['ppl']:.2f} | {union} | {margin:+.1%}{mark} "
                     f"| {default['search']['chosen']} |")
    lines += ["", "| model | ratio | calibration | seeds | uniform | log_increase | default | default vs the better "
              "fixed shape, mean (min, max) | seeds better than both |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (model, ratio, sampling), entries in cells.items():
        margins = [m for _, _, m in entries]
        lines.append(f"| {model} | {ratio:.0%} | {sampling} | {len(entries)} | "
                     f"{_fmt([r['uniform']['ppl'] for r, _, _ in entries])} | "
                     f"{_fmt([r['log_increase']['ppl'] for r, _, _ in entries])} | {_fmt([d for _, d, _ in entries])} | "
                     f"{statistics.mean(margins):+.1%} ({min(margins):+.1%}, {max(margins):+.1%}) | "
                     f"{sum(m < 0 for m in margins)}/{len(margins)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(seeds_table(sys.argv[2:]) if sys.argv[1:2] == ["seeds"] else table(sys.argv[1:]))
