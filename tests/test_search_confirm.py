"""The adaptive search's confirmation: its best-scored candidates pruned again on every calibration row, as the
final pass prunes, and the best of those kept."""

import copy

import pytest
import torch

import slimflow
from slimflow import allocation
from slimflow.adapters import get_adapter
from slimflow.algorithms.schedules import ScheduleError
from slimflow.api import plan
from slimflow.methods import get_method
from slimflow.pipeline import prune_layers
from tests.tiny_models import tiny_model


def _ids(n, length=24, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


SHAPES = {"uniform": ("uniform", 1.0), "log_increase:8": ("log_increase", 8.0), "linear:4": ("linear", 4.0),
          "log_increase:2": ("log_increase", 2.0)}


def _candidates(model):
    return {name: plan(model, 0.35, schedule, spread=spread).layers for name, (schedule, spread) in SHAPES.items()}


def _loss_after(model, adapter, rows, plans, scored):
    """Brute force: prune a copy on `rows`, float64 next-token loss on `scored`."""
    trial = copy.deepcopy(model)
    prune_layers(trial, adapter, rows, plans, get_method("slimgpt"), torch.device("cpu"), 4, progress=False)
    with torch.no_grad():
        logits = trial(scored).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 128), scored[:, 1:].reshape(-1)))


def _family_bests(ranked):
    return {allocation.family(k): k for k in reversed(ranked)}.values()


def _search(model, ids, candidates, confirm, scored=None, confirmed=None):
    return allocation.search_plans(model, get_adapter(model), ids, candidates, get_method("slimgpt"),
                                   torch.device("cpu"), batch_size=4, search_samples=4, holdout=4, progress=False,
                                   scored=scored, confirm=confirm, confirmed=confirmed)


@pytest.mark.parametrize("confirm", [2, 3, 4])
def test_confirmation_prunes_the_best_candidates_on_every_row_and_keeps_the_best_of_those(confirm):
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    adapter, ids, windows = get_adapter(model), _ids(12), _ids(6, seed=5)
    candidates = _candidates(model)
    assert len(candidates) == 4
    confirmed: dict = {}
    chosen, scores = _search(model, ids, candidates, confirm, windows, confirmed)
    train, _ = allocation.search_rows(12, 4, 4, generated=True)
    search = {k: _loss_after(model, adapter, ids[train], p, windows) for k, p in candidates.items()}
    final = {k: _loss_after(model, adapter, ids, p, windows) for k, p in candidates.items()}
    assert scores == pytest.approx(search, rel=1e-4)
    finalists = sorted(search, key=search.get)[:confirm]
    # the finalists, each pruned on all 12 rows (not the search's 4) and scored on the same windows
    assert set(confirmed) == set(finalists)
    assert confirmed == pytest.approx({k: final[k] for k in finalists}, rel=1e-4)
    assert chosen == min(finalists, key=final.get)
    # the case matters: pruned on every row, the ranking changes (else the check above could not fail)
    assert sorted(final, key=final.get) != sorted(search, key=search.get)
    if confirm == 4:  # every candidate confirmed: the best final prune, whatever the search's ranking
        assert chosen == min(final, key=final.get)


def test_confirmation_with_held_out_rows_prunes_on_every_row_but_those():
    model = tiny_model("llama", num_hidden_layers=2)
    adapter, ids = get_adapter(model), _ids(16)
    candidates = _candidates(model)
    confirmed: dict = {}
    chosen, _ = _search(model, ids, candidates, 2, confirmed=confirmed)
    _, held = allocation.search_rows(16, 4, 4)
    rest = [r for r in range(16) if r not in held]
    expected = {k: _loss_after(model, adapter, ids[rest], candidates[k], ids[held]) for k in confirmed}
    assert len(confirmed) == 2 and confirmed == pytest.approx(expected, rel=1e-4)
    assert chosen == min(expected, key=expected.get)


def test_no_confirmation_when_the_search_already_pruned_on_every_row_or_confirm_is_one():
    model = tiny_model("llama", num_hidden_layers=2)
    candidates, windows = _candidates(model), _ids(4, seed=5)
    for ids, confirm in ((_ids(4), 2), (_ids(12), 1)):
        confirmed: dict = {}
        chosen, scores = _search(model, ids, candidates, confirm, windows, confirmed)
        assert confirmed == {} and chosen == min(scores, key=scores.get)


def test_prune_records_the_confirmed_scores_and_refuses_a_bad_confirm():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    ids, windows = _ids(12), _ids(6, seed=5)
    options = {"search_samples": 4}
    report = slimflow.prune(model, ids, 0.3, schedule="adaptive", device="cpu", batch_size=4, progress=False,
                            generated_samples=0, scoring=windows, schedule_options=options)
    search = report.settings["allocation"]["search"]
    ranked = sorted(search["scores"], key=search["scores"].get)  # by default: the two best and each family's best
    assert set(search["confirmed"]) == set(ranked[:allocation.CONFIRM]) | set(_family_bests(ranked))
    assert search["chosen"] == min(search["confirmed"], key=search["confirmed"].get)
    assert set(search["confirmed"]) <= set(search["scores"])
    for bad in (0, -1, 1.5, "2", True, "family"):
        with pytest.raises(ScheduleError, match="confirm must be a positive integer or \"families\""):
            slimflow.prune(tiny_model("llama"), ids, 0.3, schedule="adaptive", device="cpu", progress=False,
                           schedule_options={"confirm": bad})


def test_confirming_families_prunes_the_best_of_each_family_again():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    adapter, ids, windows = get_adapter(model), _ids(12), _ids(6, seed=5)
    shapes = _candidates(model)  # two fixed shapes, one named as a blend, one as a cost plan
    candidates = {"uniform": shapes["uniform"], "log_increase:8": shapes["log_increase:8"],
                  "blend:linear": shapes["linear:4"], "cost:log2": shapes["log_increase:2"]}
    assert [allocation.family(k) for k in candidates] == ["fixed", "fixed", "blend", "cost"]
    confirmed: dict = {}
    chosen, scores = _search(model, ids, candidates, "families", windows, confirmed)
    fixed = min(("uniform", "log_increase:8"), key=scores.get)
    assert set(confirmed) == {fixed, "blend:linear", "cost:log2"}
    final = {k: _loss_after(model, adapter, ids, candidates[k], windows) for k in confirmed}
    assert confirmed == pytest.approx(final, rel=1e-4)
    assert chosen == min(final, key=final.get)
    # the worse fixed shape is not among them, and it matters: its final prune scores otherwise
    other = ({"uniform", "log_increase:8"} - {fixed}).pop()
    assert _loss_after(model, adapter, ids, candidates[other], windows) != pytest.approx(final[fixed], rel=1e-4)


def test_confirming_the_two_best_and_each_familys_best():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    adapter, ids, windows = get_adapter(model), _ids(12), _ids(6, seed=5)
    shapes = _candidates(model)
    candidates = {"uniform": shapes["uniform"], "log_increase:8": shapes["log_increase:8"],
                  "blend:linear": shapes["linear:4"], "cost:log2": shapes["log_increase:2"]}
    confirmed: dict = {}
    chosen, scores = allocation.search_plans(model, adapter, ids, candidates, get_method("slimgpt"),
                                             torch.device("cpu"), batch_size=4, search_samples=4, holdout=4,
                                             progress=False, scored=windows, confirm=2, confirmed=confirmed,
                                             confirm_families=True)
    ranked = sorted(scores, key=scores.get)
    assert set(confirmed) == set(ranked[:2]) | set(_family_bests(ranked))
    # both fixed shapes among the two best: then all four are pruned again, else three
    assert len(confirmed) == (4 if {allocation.family(k) for k in ranked[:2]} == {"fixed"} else 3)
    final = {k: _loss_after(model, adapter, ids, candidates[k], windows) for k in confirmed}
    assert confirmed == pytest.approx(final, rel=1e-4)
    assert chosen == min(final, key=final.get)
    assert allocation._finalists(["a", "b", "blend:x", "cost:y", "blend:z"], 2, True) == ["a", "b", "blend:x", "cost:y"]
    assert allocation._finalists(["a", "b", "blend:x"], "families") == ["a", "blend:x"]
    for bad in (1, "yes", None):
        with pytest.raises(ScheduleError, match="confirm_families must be true or false"):
            slimflow.prune(tiny_model("llama"), ids, 0.3, schedule="adaptive", device="cpu", progress=False,
                           schedule_options={"confirm_families": bad})


def test_prune_passes_confirm_families_to_the_search():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    ids, windows = _ids(12), _ids(6, seed=5)
    for families in (False, True):
        report = slimflow.prune(copy.deepcopy(model), ids, 0.3, schedule="adaptive", device="cpu", batch_size=4,
                                progress=False, generated_samples=0, scoring=windows,
                                schedule_options={"search_samples": 4, "confirm_families": families})
        search = report.settings["allocation"]["search"]
        ranked = sorted(search["scores"], key=search["scores"].get)
        expected = set(ranked[:2]) | (set(_family_bests(ranked)) if families else set())
        assert set(search["confirmed"]) == expected
        assert len(expected) > 2 if families else len(expected) == 2
