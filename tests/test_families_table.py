"""benchmarks/families_table.py: the union of two confirmation rules is read from their rows, and the seeds table
counts a run against its better fixed shape with the union where it was measured and the two-best row where not."""

import json

import pytest

from benchmarks.families_table import runs, seeds_table, union

SCORES = {"cost:gradient": 4.0, "uniform": 4.1, "blend:uniform": 4.05}


def _row(schedule, ppl, seed=0, options=None, chosen=None, confirmed=None, error=None, spread=4.0):
    row = {"group": "main" if seed == 0 else "seeds", "model": "m", "ratio": 0.2, "sampling": "random", "seed": seed,
           "schedule": schedule, "spread": 1.0 if schedule == "uniform" else spread, "options": options or {},
           "ppl": ppl, "books128": ppl}
    if schedule == "adaptive":
        row["search"] = {"chosen": chosen, "scores": SCORES, "confirmed": confirmed}
    if error:
        row = {k: v for k, v in row.items() if k != "ppl"} | {"error": error}
    return row


TWO = {"confirm": 2, "confirm_families": False}
FAMILIES = {"confirm": "families"}


def test_union_keeps_the_row_whose_plan_scores_best_when_pruned_on_every_row():
    two = _row("adaptive", 90.0, options=TWO, chosen="blend:uniform",
               confirmed={"blend:uniform": 4.02, "cost:gradient": 4.03})
    families = _row("adaptive", 88.0, options=FAMILIES, chosen="uniform",
                    confirmed={"blend:uniform": 4.02, "uniform": 4.01, "cost:gradient": 4.03})
    assert union(two, families) is families
    families["search"]["confirmed"]["uniform"] = 4.05
    families["search"]["chosen"] = "blend:uniform"
    assert union(two, families) is two
    # a candidate both rules confirmed must score alike in both (the same prune on every row)
    families["search"]["confirmed"]["cost:gradient"] = 4.0
    with pytest.raises(AssertionError):
        union(two, families)


def _write(tmp_path, rows, name="rows.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"rows": rows}))
    return str(path)


def test_seeds_table_uses_the_union_where_measured_and_the_two_best_row_elsewhere(tmp_path):
    confirmed = {"cost:gradient": 4.0, "uniform": 4.1}
    seed0 = [_row("uniform", 100.0), _row("log_increase", 98.0), _row("log_increase", 50.0, spread=2.0),
             _row("adaptive", 99.0, options=TWO, chosen="cost:gradient", confirmed=confirmed),
             _row("adaptive", 96.0, options=FAMILIES, chosen="blend:uniform",
                  confirmed={"cost:gradient": 4.0, "blend:uniform": 3.9})]
    seed1 = [_row("uniform", 100.0, seed=1), _row("log_increase", 100.0, seed=1),
             _row("adaptive", 101.0, seed=1, options=TWO, chosen="uniform", confirmed=confirmed),
             _row("adaptive", None, seed=1, options=FAMILIES, error="InsufficientMemoryError: ...")]
    seed2 = [_row("uniform", 100.0, seed=2), _row("adaptive", 90.0, seed=2, options=TWO, chosen="uniform",
                                                   confirmed=confirmed)]  # no log_increase: not a complete run
    path = _write(tmp_path, seed0 + seed1 + seed2)
    assert sorted(k[3] for k in runs([path], complete=False)) == [0, 1]
    assert list(runs([path])) == [("m", 0.2, "random", 0)]
    text = seeds_table([path])
    lines = text.splitlines()
    assert lines[2] == "| m | 20% | random | 0 | 100.00 | 98.00 | 99.00 | 96.00 | -2.0% | blend:uniform |"
    assert lines[3] == "| m | 20% | random | 1 | 100.00 | 100.00 | 101.00 | – | +1.0% (two best) | uniform |"
    assert lines[-1] == "| m | 20% | random | 2 | 100.0 ± 0.0 | 99.0 ± 1.4 | 98.5 ± 3.5 | -0.5% (-2.0%, +1.0%) | 1/2 |"


def test_a_later_file_replaces_the_rows_of_an_earlier_one(tmp_path):
    confirmed = {"cost:gradient": 4.0}
    first = _write(tmp_path, [_row("uniform", 100.0), _row("log_increase", 98.0),
                              _row("adaptive", 99.0, options=TWO, chosen="cost:gradient", confirmed=confirmed)], "a.json")
    second = _write(tmp_path, [_row("adaptive", 97.0, options=TWO, chosen="cost:gradient", confirmed=confirmed)],
                    "b.json")
    assert runs([first, second], complete=False)[("m", 0.2, "random", 0)]["two"]["ppl"] == 97.0
