"""The adaptive search scored on windows of the calibration source: which windows are drawn, and how the
search uses them (no calibration row held out, every candidate scored on them alone)."""

import copy
import gzip

import pytest
import torch

import slimflow
from slimflow.adapters import get_adapter
from slimflow.data.calibration import SHARED_RUN, calibration_ids, scoring_ids
from slimflow.methods import get_method
from slimflow.pipeline import prune_layers
from tests.tiny_models import tiny_model


class PositionTokenizer:
    """Word `w<i>` is token `i`: a text of distinct words gives each token its position, so that overlaps of
    windows can be read off their ids."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def _text(tmp_path, words=20_000):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{i}" for i in range(words)))
    return str(path)


def _longest_shared_run(a: list[int], b: list[int]) -> int:
    """Brute force: the longest run of consecutive positions two windows of distinct tokens share."""
    shared = set(a) & set(b)
    return len(shared)  # windows are runs of consecutive positions, so their intersection is one run


@pytest.mark.parametrize("sampling", ["random", "tail"])
def test_scoring_windows_overlap_neither_the_calibration_rows_nor_each_other(tmp_path, sampling):
    text, tok = _text(tmp_path), PositionTokenizer()
    calibration = calibration_ids(text, tok, 24, 64, seed=3, sampling=sampling, skip_tokens=1000)
    windows = scoring_ids(text, tok, 12, 64, seed=3, skip_tokens=1000, avoid=calibration)
    assert windows.shape == (12, 64)
    rows, cal = windows.tolist(), calibration.tolist()
    for i, w in enumerate(rows):
        assert w == list(range(w[0], w[0] + 64)) and w[0] >= 1000  # a window of the text, after skip_tokens
        assert all(_longest_shared_run(w, c) < SHARED_RUN for c in cal)
        assert all(_longest_shared_run(w, v) < SHARED_RUN for v in rows[i + 1 :])
    if sampling == "tail":  # drawn from the whole text, not next to the tail windows
        assert max(w[0] for w in rows) < calibration.min()
    # one seed, one draw; another seed, other windows
    assert torch.equal(windows, scoring_ids(text, tok, 12, 64, seed=3, skip_tokens=1000, avoid=calibration))
    assert not torch.equal(windows, scoring_ids(text, tok, 12, 64, seed=4, skip_tokens=1000, avoid=calibration))


def test_without_avoid_the_same_draw_does_overlap_the_calibration_rows(tmp_path):
    # the check above fails when `avoid` is ignored: most windows of the same region then share runs
    text, tok = _text(tmp_path, 6_000), PositionTokenizer()
    calibration = calibration_ids(text, tok, 32, 64, seed=0)
    free = scoring_ids(text, tok, 16, 64, seed=0).tolist()
    assert any(_longest_shared_run(w, c) >= SHARED_RUN for w in free for c in calibration.tolist())


def test_a_source_too_short_for_one_window_gives_none_and_a_crowded_one_fewer_windows(tmp_path):
    tok = PositionTokenizer()
    short = _text(tmp_path, 40)
    assert scoring_ids(short, tok, 8, 64) is None
    crowded = _text(tmp_path, 1_000)
    calibration = calibration_ids(crowded, tok, 12, 64, seed=0)  # most of the text
    windows = scoring_ids(crowded, tok, 8, 64, avoid=calibration)
    assert windows is None or 1 <= windows.shape[0] < 8


def test_gzip_sources_give_the_same_windows(tmp_path):
    text = _text(tmp_path, 5_000)
    packed = tmp_path / "text.txt.gz"
    packed.write_bytes(gzip.compress(open(text, "rb").read()))
    tok = PositionTokenizer()
    assert torch.equal(scoring_ids(text, tok, 4, 32, seed=1), scoring_ids(str(packed), tok, 4, 32, seed=1))


def _ids(n, length, seed):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_search_scored_on_source_windows_prunes_on_every_row_and_scores_on_the_windows_only():
    ids, windows = _ids(16, 24, 0), _ids(5, 24, 1)
    model = tiny_model("llama_gqa")
    report = slimflow.prune(copy.deepcopy(model), ids, ratio=0.35, schedule="adaptive", progress=False,
                            generated_samples=0, scoring=windows)
    info = report.settings["allocation"]
    search = info["search"]
    assert search["score_on"] == "source" and search["split"] == [16, 5] and info["measured_rows"] == 16
    # brute force: every candidate pruned on all 16 rows (none held out), its float64 loss on the 5 windows
    adapter = get_adapter(model)
    fixed = slimflow.api._fixed_shape_plans(model, 0.35, sum(p.numel() for p in model.parameters()), None, 1)
    for name in ("uniform", "log_increase:4"):
        trial = copy.deepcopy(model)
        prune_layers(trial, adapter, ids, fixed[name], get_method("slimgpt"), torch.device("cpu"), 8, progress=False)
        with torch.no_grad():
            logp = torch.log_softmax(trial(windows).logits[:, :-1].double(), -1)
        rows = -logp.gather(-1, windows[:, 1:, None])[..., 0].mean(-1)
        assert search["row_scores"][name] == pytest.approx(rows.tolist(), abs=1e-4)
        assert search["scores"][name] == pytest.approx(float(rows.mean()), abs=1e-4)
    assert search["chosen"] == min(search["scores"], key=search["scores"].get)


def test_new_window_content_moves_only_the_scores_and_new_calibration_content_moves_the_curves():
    ids, windows = _ids(16, 24, 0), _ids(5, 24, 1)

    def run(calibration, scoring):
        return slimflow.prune(tiny_model("llama_gqa"), calibration, ratio=0.35, schedule="adaptive",
                              progress=False, generated_samples=0, scoring=scoring).settings["allocation"]

    base = run(ids, windows)
    other_windows = run(ids, _ids(5, 24, 2))
    for key in ("head_curves", "channel_curves", "residual_energy", "gradient_energy"):
        assert other_windows[key] == base[key], key
    assert other_windows["search"]["scores"] != base["search"]["scores"]
    other_rows = ids.clone()
    other_rows[5] = _ids(1, 24, 3)[0]  # a row the held-out default would not hold out: every row informs the curves
    assert run(other_rows, windows)["head_curves"] != base["head_curves"]


def test_without_windows_or_with_score_on_calibration_the_search_holds_out_calibration_rows():
    ids, windows = _ids(16, 24, 0), _ids(5, 24, 1)

    def search(**kw):
        return slimflow.prune(tiny_model("llama_gqa"), ids, ratio=0.35, schedule="adaptive", progress=False,
                              generated_samples=0, **kw).settings["allocation"]

    plain = search()
    assert plain["search"]["score_on"] == "calibration" and plain["search"]["split"] == [12, 4]
    assert plain["measured_rows"] == 12
    told = search(scoring=windows, schedule_options={"score_on": "calibration"})
    assert told["search"]["scores"] == plain["search"]["scores"]
    with pytest.raises(ValueError, match="scoring must be a"):
        search(scoring=windows[0])


def test_only_a_searching_adaptive_schedule_asks_for_windows_and_how_many():
    from slimflow.api import scoring_windows, searches

    assert [scoring_windows(n) for n in (512, 2048, 128, 8192)] == [128, 32, 512, 16]

    assert searches("adaptive", None) and searches("adaptive", {"holdout": 8})
    assert not searches("adaptive", {"search": False}) and not searches("adaptive", {"score_on": "calibration"})
    assert not searches("log_increase", None) and not searches(None, None)
