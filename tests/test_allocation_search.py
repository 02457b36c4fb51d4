"""The adaptive schedule's search: candidate allocations pruned on part of the calibration set and scored on
held-out calibration sequences against the dense model."""

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


def _ids(n=16, length=24, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_kl_score_matches_a_float64_reference_and_vanishes_for_the_dense_model():
    dense, other = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = _ids(5, 12)
    got = allocation.holdout_score(other, ids, batch_size=2, dense=dense)
    with torch.no_grad():
        p = torch.log_softmax(dense(ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(other(ids).logits[:, :-1].double(), -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum") / (5 * 11)
    assert got == pytest.approx(float(expected), rel=1e-4)
    assert allocation.holdout_score(dense, ids, batch_size=2, dense=dense) == pytest.approx(0.0, abs=1e-6)
    # the loss score is the mean next-token cross-entropy
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(dense(ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert allocation.holdout_score(dense, ids, batch_size=3) == pytest.approx(float(ce), rel=1e-5)


def test_search_keeps_the_candidate_closest_to_the_dense_model_on_held_out_sequences(monkeypatch):
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    adapter, ids = get_adapter(model), _ids(16)
    candidates = {name: plan(model, 0.35, name, spread=spread).layers
                  for name, spread in (("uniform", 1.0), ("log_increase", 8.0), ("linear", 4.0))}
    seen = []
    real = allocation.prune_layers
    monkeypatch.setattr(allocation, "prune_layers", lambda m, a, x, *rest, **kw: (seen.append(x), real(m, a, x, *rest,
                                                                                                           **kw))[1])
    chosen, scores = allocation.search_plans(model, adapter, ids, candidates, get_method("slimgpt"),
                                             torch.device("cpu"), batch_size=4, search_samples=8, holdout=4,
                                             score="kl", progress=False)
    # each candidate pruned on 8 sequences spread over the set; 4 others (never pruned on) score it
    train, held = allocation.search_rows(16, 8, 4)
    assert held == [2, 6, 10, 14] and len(train) == 8 and not set(train) & set(held)
    assert all(torch.equal(x, ids[train]) for x in seen) and len(seen) == 3
    expected = {}
    for name, plans in candidates.items():  # brute force: prune a copy, KL on the held-out rows
        trial = copy.deepcopy(model)
        prune_layers(trial, adapter, ids[train], plans, get_method("slimgpt"), torch.device("cpu"), 4, progress=False)
        with torch.no_grad():
            p = torch.log_softmax(model(ids[held]).logits[:, :-1].double(), -1)
            q = torch.log_softmax(trial(ids[held]).logits[:, :-1].double(), -1)
        expected[name] = float((p.exp() * (p - q)).sum(-1).mean())
    assert scores == pytest.approx(expected, rel=1e-4)
    assert chosen == min(expected, key=expected.get)
    assert len(set(round(v, 6) for v in expected.values())) == 3  # the choice is not a tie
    # the default score: next-token loss on the same held-out rows
    chosen, scores = allocation.search_plans(model, adapter, ids, candidates, get_method("slimgpt"),
                                             torch.device("cpu"), batch_size=4, search_samples=8, holdout=4,
                                             progress=False)
    for name, plans in candidates.items():
        trial = copy.deepcopy(model)
        prune_layers(trial, adapter, ids[train], plans, get_method("slimgpt"), torch.device("cpu"), 4, progress=False)
        with torch.no_grad():
            logits = trial(ids[held]).logits[:, :-1].double()
        expected[name] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 128),
                                                                 ids[held][:, 1:].reshape(-1)))
    assert scores == pytest.approx(expected, rel=1e-4)
    assert chosen == min(expected, key=expected.get)


def test_default_adaptive_records_its_search_and_hits_the_ratio():
    model = tiny_model("qwen2")
    report = slimflow.prune(model, _ids(16, 32), ratio=0.4, schedule="adaptive", progress=False)
    search = report.settings["allocation"]["search"]
    assert set(search["scores"]) >= {"cost:gradient", "cost:residual", "uniform", "log_increase:4",
                                     "blend:uniform", "blend:log_increase:2"}
    assert search["families"] == ["cost", "fixed", "blend"]
    assert search["chosen"] == min(search["scores"], key=search["scores"].get)
    # by default the adaptive schedule adds 256 sequences sampled from the model: 272 rows, 32 prune, 16 score
    assert (report.settings["num_samples"], report.settings["generated_samples"]) == (16, 256)
    assert search["split"] == [32, 16] and search["score"] == "loss"
    assert abs(report.realised_fraction - 0.4) <= 0.005
    fixed = slimflow.prune(tiny_model("qwen2"), _ids(16, 32), ratio=0.4, progress=False)
    assert fixed.settings["generated_samples"] == 0  # a fixed shape samples nothing unless asked
    # without the search the plan is the cost plan, and nothing is scored
    off = slimflow.prune(tiny_model("qwen2"), _ids(16, 32), ratio=0.4, schedule="adaptive", progress=False,
                         schedule_options={"search": False})
    assert "search" not in off.settings["allocation"]


def test_the_rows_that_score_the_search_inform_no_candidate():
    ids = _ids(16, 32)
    _, held = allocation.search_rows(16)
    assert held == [2, 6, 10, 14]

    def run(calibration):
        report = slimflow.prune(tiny_model("llama_gqa"), calibration, ratio=0.4, schedule="adaptive",
                                generated_samples=0, progress=False)
        return report.settings["allocation"]

    base = run(ids)
    other = ids.clone()
    other[held] = _ids(4, 32, seed=7)
    changed = run(other)
    # the cost curves behind the cost and blend plans do not see the scoring rows, which still score
    for key in ("head_curves", "channel_curves", "residual_energy", "gradient_energy"):
        assert changed[key] == base[key], key
    assert changed["search"]["scores"] != base["search"]["scores"]
    assert base["measured_rows"] == 12
    pruning = other.clone()  # a row that prunes the candidates does move the curves
    pruning[3] = _ids(1, 32, seed=8)[0]
    assert run(pruning)["channel_curves"] != base["channel_curves"]


def test_search_rows_are_disjoint_and_spread_over_the_whole_calibration_set():
    for n, search, hold in ((128, 32, 16), (256, 32, 16), (20, 32, 16), (9, 4, 2)):
        train, held = allocation.search_rows(n, search, hold)
        assert (len(train), len(held)) == allocation.search_split(n, search, hold)
        assert not set(train) & set(held) and len(set(train)) == len(train) and len(set(held)) == len(held)
        for rows in (train, held):  # every half of the set is represented (real text, then sampled sequences)
            assert any(r < n // 2 for r in rows) and any(r >= n // 2 for r in rows)
    train, held = allocation.search_rows(8, 32, 16, generated=True)
    assert train == list(range(8)) and held == []


def test_too_few_sequences_to_hold_out_falls_back_to_the_cost_plan():
    report = slimflow.prune(tiny_model("llama"), _ids(3, 24), ratio=0.3, schedule="adaptive", progress=False,
                            generated_samples=0)
    assert "search" not in report.settings["allocation"]
    assert allocation.search_split(3) is None and allocation.search_split(128) == (32, 16)
    assert allocation.search_split(20, 32, 16) == (15, 5)


@pytest.mark.parametrize("options,match", [({"score": "ppl"}, "choose one of loss, kl"),
                                           ({"holdout": 0}, "holdout must be a positive integer")])
def test_bad_search_options_fail_before_any_work(options, match):
    with pytest.raises(ScheduleError, match=match):
        slimflow.prune(tiny_model(), _ids(), ratio=0.3, schedule="adaptive", schedule_options=options)


def test_the_adaptive_schedule_refuses_a_layer_store_before_any_work():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adaptive schedule measures the whole model"):
        slimflow.prune(model, _ids(8, 16), ratio=0.3, schedule="adaptive", progress=False, layer_store=object())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_default_sampled_count_keeps_256_by_512_tokens():
    from slimflow.api import default_generated_samples

    assert [default_generated_samples("adaptive", seqlen=n) for n in (32, 512, 1024, 2048, 4096)] == [256, 256, 128,
                                                                                                      64, 32]
    assert default_generated_samples("adaptive", streaming=True, seqlen=512) == 0
    assert default_generated_samples("log_increase", seqlen=512) == default_generated_samples(None) == 0


@pytest.mark.parametrize("rows", [1, 8])
def test_a_negative_sampled_count_is_refused_before_any_work(rows):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="generated_samples must be ≥ 0, got -3"):
        slimflow.prune(model, _ids(rows, 16), ratio=0.3, progress=False, generated_samples=-3)


def test_text_scoring_holds_out_only_among_the_leading_text_rows():
    train, held = allocation.search_rows(384, 32, 16, text_rows=128)
    assert len(held) == 16 and max(held) < 128 and held[0] == 4 and held[-1] == 124  # spread over the text
    assert len(train) == 32 and not set(train) & set(held) and max(train) >= 128  # pruning rows: text and samples
    assert allocation.search_split(384, 32, 16, text_rows=20) == (32, 5)  # a quarter of the text at most
    assert allocation.search_split(384, 32, 16, text_rows=3) is None


def test_text_scoring_rows_come_from_the_calibration_text_not_the_sampled_sequences():
    ids = _ids(16, 32)

    def run(options, text=ids):
        report = slimflow.prune(tiny_model("llama_gqa"), text, ratio=0.4, schedule="adaptive", progress=False,
                                generated_samples=48, schedule_options=options)
        return report.settings["allocation"]

    base = run({"score_on": "text"})
    assert base["search"]["split"] == [32, 4] and base["measured_rows"] == 60
    _, held = allocation.search_rows(64, 32, 16, text_rows=16)
    assert held == [2, 6, 10, 14]
    other = ids.clone()  # the scoring rows are these text rows: new content there moves only the scores
    other[held] = _ids(4, 32, seed=7)
    changed = run({"score_on": "text"}, other)
    for key in ("head_curves", "channel_curves", "residual_energy", "gradient_energy"):
        assert changed[key] == base[key], key
    assert changed["search"]["scores"] != base["search"]["scores"]
    # the default spreads its scoring rows over text and samples alike, and so scores otherwise
    default = run({})
    assert default["search"]["split"] == [32, 16] and default["search"]["scores"] != base["search"]["scores"]
    # without sampled rows "text" is "calibration"
    plain = [slimflow.prune(tiny_model("llama_gqa"), ids, ratio=0.4, schedule="adaptive", progress=False,
                            generated_samples=0, schedule_options=o).settings["allocation"]["search"]["scores"]
             for o in ({"score_on": "text"}, {})]
    assert plain[0] == plain[1]


def test_context_windows_cut_each_row_into_consecutive_windows():
    ids = torch.arange(2 * 10).reshape(2, 10)
    assert allocation.context_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13],
                                                          [14, 15, 16, 17]]
    assert allocation.context_windows(ids, 10) is ids and allocation.context_windows(ids, 64) is ids


def test_score_at_short_context_is_the_loss_of_each_window_scored_alone():
    model = tiny_model("llama_gqa")
    ids = _ids(3, 24)

    def brute(window):  # every window of every row predicted from its own tokens only, float64 loss
        total, count = 0.0, 0
        for row in ids:
            for start in range(0, 24 - window + 1, window):
                piece = row[start : start + window][None]
                with torch.no_grad():
                    logp = torch.log_softmax(model(piece).logits[0, :-1].double(), -1)
                total -= float(logp.gather(-1, piece[0, 1:, None]).sum())
                count += window - 1
        return total / count

    assert allocation.holdout_score(model, ids, 2, context=[8]) == pytest.approx(brute(8), rel=1e-5)
    both = allocation.holdout_score(model, ids, 2, context=[8, 24])
    assert both == pytest.approx((brute(8) + brute(24)) / 2, rel=1e-5)
    assert brute(8) != pytest.approx(brute(24), rel=1e-3)  # the context length matters to the score


def test_the_search_scores_at_the_context_it_is_given_and_refuses_bad_lengths():
    def run(options):
        report = slimflow.prune(tiny_model("llama_gqa"), _ids(16, 32), ratio=0.4, schedule="adaptive",
                                progress=False, generated_samples=0, schedule_options=options)
        return report.settings["allocation"]["search"]

    default, short = run({}), run({"score_context": [8]})
    assert short["score_context"] == [8] and default["score_context"] is None
    assert set(short["scores"]) == set(default["scores"]) and short["scores"] != default["scores"]
    assert run({"score_context": [32]})["scores"] == default["scores"]  # the whole rows: the default score
    for bad in ([], [1], "128", [True], [128.0]):
        with pytest.raises(ScheduleError, match="score_context"):
            slimflow.prune(tiny_model("llama_gqa"), _ids(), 0.3, schedule="adaptive", progress=False,
                           schedule_options={"score_context": bad})


def test_copy_to_is_a_deep_copy_with_shared_weights_still_shared():
    model = tiny_model("llama", tie_word_embeddings=True)
    trial = allocation.copy_to(model, "cpu")
    assert trial is not model and trial.lm_head.weight is trial.model.embed_tokens.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), trial.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    with torch.no_grad():
        trial.lm_head.weight.zero_()
    assert model.lm_head.weight.abs().sum() > 0  # the original is untouched
