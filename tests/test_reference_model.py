"""Integration: prune the shared 27M reference model with real text and check what a user relies on."""

import math

import pytest
import torch

import slimflow
from conftest import HELD_OUT_TEXT, REFERENCE_MODEL, require_shared
from slimflow.data.calibration import calibration_ids
from slimflow.models import load_model, load_tokenizer

pytestmark = pytest.mark.integration


def _ppl(model, ids):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_slimgpt_on_reference_model_beats_magnitude_and_compensates_every_layer():
    require_shared(REFERENCE_MODEL)
    require_shared(HELD_OUT_TEXT)
    tokenizer = load_tokenizer(str(REFERENCE_MODEL))
    calib = calibration_ids(str(HELD_OUT_TEXT), tokenizer, num_samples=16, seqlen=128, sampling="tail")
    held_out = calibration_ids(str(HELD_OUT_TEXT), tokenizer, num_samples=8, seqlen=128, seed=1, sampling="random")
    dense = load_model(str(REFERENCE_MODEL), dtype="float32")
    dense_ppl = _ppl(dense, held_out)
    results = {}
    for method in ("slimgpt", "magnitude"):
        model = load_model(str(REFERENCE_MODEL), dtype="float32")
        report = slimflow.prune(model, calib, ratio=0.3, method=method, progress=False)
        assert abs(report.realised_fraction - 0.3) < 0.015
        results[method] = _ppl(model, held_out)
        if method == "slimgpt":
            for layer in report.layers:
                assert layer.attn_error <= layer.attn_error_uncompensated
                assert layer.ffn_error <= layer.ffn_error_uncompensated
    assert dense_ppl < results["slimgpt"] < results["magnitude"]
