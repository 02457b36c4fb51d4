"""The selection rules of `benchmarks/selection_study.py` (docs/results.md, "How the search picks"): each against
its definition on hand-made per-row losses, and the `rows` rule against the search's own choice."""

import copy

import pytest
import torch

from benchmarks.selection_study import RULES, pick
from slimflow import allocation
from slimflow.adapters import get_adapter
from slimflow.api import plan
from slimflow.methods import get_method
from tests.tiny_models import tiny_model

# rows 0-1 text, rows 2-5 sampled. Row mean: a (best on the sampled rows); text and domain mean: b (best on the
# text rows); rank sum: c (second on both, where a and b are each fourth on the other); d worst everywhere
SCORES = {"a": [5.0, 5.0, 0.9, 0.9, 0.9, 0.9],
          "b": [3.0, 3.0, 2.0, 2.0, 2.0, 2.0],
          "c": [4.0, 4.0, 1.5, 1.5, 1.5, 1.5],
          "f": [4.5, 4.5, 1.8, 1.8, 1.8, 1.8],
          "d": [9.0, 9.0, 9.0, 9.0, 9.0, 9.0]}
TEXT, SAMPLED = [0, 1], [2, 3, 4, 5]


def brute(rule):
    def mean(v, rows):
        return sum(v[r] for r in rows) / len(rows)
    if rule == "rows":
        value = {n: mean(v, TEXT + SAMPLED) for n, v in SCORES.items()}
    elif rule == "domains":
        value = {n: (mean(v, TEXT) + mean(v, SAMPLED)) / 2 for n, v in SCORES.items()}
    elif rule == "text":
        value = {n: mean(v, TEXT) for n, v in SCORES.items()}
    else:
        t = sorted(SCORES, key=lambda n: mean(SCORES[n], TEXT))
        s = sorted(SCORES, key=lambda n: mean(SCORES[n], SAMPLED))
        value = {n: t.index(n) + s.index(n) for n in SCORES}
    best = min(value.values())
    return next(n for n in SCORES if value[n] == best)  # ties keep the earlier candidate, as the search does


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_keeps_what_its_definition_keeps(rule):
    assert pick(SCORES, TEXT, SAMPLED, rule) == brute(rule)


def test_the_rules_disagree_on_these_losses():
    # rows: a 2.27 < b = c 2.33; domains: b 2.5 < c 2.75 < a 2.95; ranks: c 1+1 < a 3+0 = b 0+3
    picks = {rule: pick(SCORES, TEXT, SAMPLED, rule) for rule in RULES}
    assert picks == {"rows": "a", "domains": "b", "ranks": "c", "text": "b"}
    # more sampled rows move the row mean, not the domain mean
    wide = {n: v + [v[-1]] * 6 for n, v in SCORES.items()}
    assert pick(wide, TEXT, list(range(2, 12)), "domains") == "b"
    assert pick(wide, TEXT, list(range(2, 12)), "rows") == "a"


def test_the_rows_rule_is_the_searchs_own_choice():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(0))
    candidates = {name: plan(model, 0.35, name, spread=spread).layers
                  for name, spread in (("uniform", 1.0), ("log_increase", 8.0), ("linear", 4.0))}
    chosen, scores = allocation.search_plans(model, adapter, ids, candidates, get_method("slimgpt"),
                                             torch.device("cpu"), batch_size=4, search_samples=8, holdout=4,
                                             progress=False)
    train, held = allocation.search_rows(16, 8, 4)
    per_row = {}
    for name, plans in candidates.items():
        trial = copy.deepcopy(model)
        allocation.prune_layers(trial, adapter, ids[train], plans, get_method("slimgpt"), torch.device("cpu"), 4,
                                progress=False)
        per_row[name] = [allocation.holdout_score(trial, ids[r : r + 1]) for r in held]
        assert sum(per_row[name]) / len(held) == pytest.approx(scores[name], rel=1e-5)
    assert pick(per_row, [0, 1], [2, 3], "rows") == chosen
