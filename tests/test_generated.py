"""Sequences sampled from the model itself, and the adaptive search scored on them."""

import copy

import pytest
import torch

import slimflow
from slimflow import allocation
from slimflow.adapters import get_adapter
from slimflow.algorithms.schedules import ScheduleError
from slimflow.api import plan
from slimflow.data.generated import sample_sequences
from slimflow.methods import get_method
from slimflow.pipeline import prune_layers
from tests.tiny_models import tiny_model


def _reference_sampling(model, n, length, seed, temperature, start):
    """Brute force: the full prefix re-run at every step (no cache), one multinomial draw per step."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen2"])
def test_sampling_with_the_cache_equals_sampling_from_the_full_prefix(family):
    model = tiny_model(family)
    got = sample_sequences(model, 5, 14, seed=3, temperature=0.9, batch_size=5)
    expected = _reference_sampling(model, 5, 14, 3, 0.9, model.config.bos_token_id)
    assert torch.equal(got, expected)
    assert (got[:, 0] == model.config.bos_token_id).all() and got.shape == (5, 14)
    assert len({tuple(row.tolist()) for row in got}) == 5  # sampled, not one greedy path
    assert torch.equal(sample_sequences(model, 5, 14, seed=3, temperature=0.9, batch_size=5), got)
    assert not torch.equal(sample_sequences(model, 5, 14, seed=4, temperature=0.9, batch_size=5), got)


def test_a_low_temperature_gives_the_greedy_continuation_and_bad_arguments_fail():
    model = tiny_model()
    got = sample_sequences(model, 2, 10, temperature=1e-4, start_token=5)
    ids = torch.full((2, 1), 5)
    with torch.no_grad():
        for _ in range(9):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, ids)
    with pytest.raises(ValueError, match="temperature"):
        sample_sequences(model, 2, 10, temperature=0)
    with pytest.raises(ValueError, match="seqlen"):
        sample_sequences(model, 2, 1)


def test_search_scored_on_sampled_sequences_prunes_with_the_first_calibration_rows():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(3, 128, (8, 20), generator=torch.Generator().manual_seed(0))
    scored = sample_sequences(model, 4, 20, seed=1)
    candidates = {name: plan(model, 0.35, name, spread=spread).layers
                  for name, spread in (("uniform", 1.0), ("log_increase", 8.0), ("linear", 4.0))}
    chosen, scores = allocation.search_plans(model, adapter, ids, candidates, get_method("slimgpt"),
                                             torch.device("cpu"), batch_size=4, search_samples=8, holdout=4,
                                             progress=False, scored=scored)
    expected = {}
    for name, plans in candidates.items():  # every calibration row may prune: none is held out
        trial = copy.deepcopy(model)
        prune_layers(trial, adapter, ids, plans, get_method("slimgpt"), torch.device("cpu"), 4, progress=False)
        with torch.no_grad():
            logits = trial(scored).logits[:, :-1].double()
        expected[name] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 128), scored[:, 1:].reshape(-1)))
    assert scores == pytest.approx(expected, rel=1e-4)
    assert chosen == min(expected, key=expected.get)
    assert allocation.search_split(8, 32, 16, generated=True) == (8, 16)


def test_adaptive_scored_on_generated_text_records_it_and_hits_the_ratio():
    ids = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    report = slimflow.prune(tiny_model("qwen2"), ids, ratio=0.4, schedule="adaptive", progress=False,
                            schedule_options={"score_on": "generated", "holdout": 4}, generated_samples=0)
    search = report.settings["allocation"]["search"]
    assert search["score_on"] == "generated" and search["split"] == [16, 4]
    assert search["chosen"] == min(search["scores"], key=search["scores"].get)
    assert abs(report.realised_fraction - 0.4) <= 0.005
    with pytest.raises(ScheduleError, match="choose one of source, calibration, text, generated"):
        slimflow.prune(tiny_model(), ids, ratio=0.3, schedule="adaptive", schedule_options={"score_on": "prose"})


def test_generated_samples_prune_exactly_as_the_calibration_set_with_the_samples_appended():
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    model, twin = tiny_model("llama_gqa"), tiny_model("llama_gqa")
    sampled = sample_sequences(twin, 4, 16, seed=7)
    report = slimflow.prune(model, ids, ratio=0.3, generated_samples=4, seed=7, progress=False)
    slimflow.prune(twin, torch.cat([ids, sampled]), ratio=0.3, progress=False)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    settings = report.settings
    assert (settings["num_samples"], settings["generated_samples"], settings["seed"]) == (6, 4, 7)
    assert "sampling" in report.phase_times
    # sampled sequences alone (no calibration text) prune too
    alone = slimflow.prune(tiny_model("llama_gqa"), torch.empty(0, 16, dtype=torch.long), ratio=0.3,
                           generated_samples=4, seed=7, progress=False)
    assert alone.settings["num_samples"] == 0 and abs(alone.realised_fraction - 0.3) < 0.02
    with pytest.raises(ValueError, match="generated_samples must be"):
        slimflow.prune(tiny_model(), ids, ratio=0.3, generated_samples=-1, progress=False)
