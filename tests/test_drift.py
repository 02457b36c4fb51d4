"""Drift correction: each pruned projection starts from its least-squares refit to the dense model's outputs."""

import copy

import pytest
import torch

import slimflow
from slimflow.errors import InvalidValueError
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import refit_to_dense
from slimflow.methods.slimgpt import SlimGPT
from tests.tiny_models import tiny_model


def calibration(n=12, seqlen=20, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_cross_statistics_and_refit_match_least_squares_in_float64():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(5, 30, 8, generator=gen, dtype=torch.float64)
    pruned = dense + 0.3 * torch.randn(5, 30, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    stats = HessianAccumulator(8, dtype=torch.float64)
    for s in range(0, 5, 2):  # uneven batches: the running means must weight sequences alike
        stats.add(pruned[s : s + 2], dense=dense[s : s + 2])
    xp, xd = pruned.reshape(-1, 8), dense.reshape(-1, 8)
    torch.testing.assert_close(stats.cross, 2 / 5 * xd.t() @ xp)
    expected = torch.linalg.lstsq(xp, xd @ weight.t()).solution.t()  # argmin ‖W' X_p − W X_d‖
    torch.testing.assert_close(refit_to_dense(weight, stats.hessian, stats.cross, damp=0.0), expected)
    # with damping it is the ridge solution
    h = stats.hessian + 0.1 * torch.diagonal(stats.hessian).mean() * torch.eye(8, dtype=torch.float64)
    ridge = torch.linalg.solve(h, (weight @ stats.cross).t()).t()
    torch.testing.assert_close(refit_to_dense(weight, stats.hessian, stats.cross, damp=0.1), ridge)


def test_refit_is_the_identity_without_drift():
    x = torch.randn(4, 25, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(3, 8, dtype=torch.float64)
    stats = HessianAccumulator(8, dtype=torch.float64)
    stats.add(x, dense=x)
    torch.testing.assert_close(refit_to_dense(weight, stats.hessian, stats.cross, damp=0.0), weight)


class _Recorder(SlimGPT):
    """SlimGPT that keeps the weight each decision starts from."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def prune_heads(self, weight, stats, unit_size, n_remove):
        self.seen.append(("o_proj", weight.clone()))
        return super().prune_heads(weight, stats, unit_size, n_remove)

    def prune_channels(self, weight, stats, n_remove):
        self.seen.append(("down_proj", weight.clone()))
        return super().prune_channels(weight, stats, n_remove)


def _inputs_of(module, model, ids):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_second_layer_starts_from_the_refit_to_dense_outputs(family):
    """Layer 1's o_proj / down_proj decisions start from argmin ‖W' X − W X̂‖ + damping, X from the model whose
    layer 0 is already pruned (and, for down_proj, layer 1's heads), X̂ from the dense model."""
    dense = tiny_model(family)
    ids = calibration()
    model, method = copy.deepcopy(dense), _Recorder()
    slimflow.prune(model, ids, ratio=0.3, schedule="uniform", method=method, progress=False, batch_size=5,
                   correct_drift=True)
    assert [k for k, _ in method.seen] == ["o_proj", "down_proj"] * 3

    # the model as layer 1 saw it when its heads were chosen: pruned layer 0, dense layer 1
    partial = copy.deepcopy(dense)
    partial.model.layers[0] = copy.deepcopy(model.model.layers[0])

    def expected(module_of, hybrid, weight):
        xp = _inputs_of(module_of(hybrid.model.layers[1]), hybrid, ids)
        xd = _inputs_of(module_of(dense.model.layers[1]), dense, ids)
        h = 2 / len(ids) * xp.t() @ xp
        h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
        return torch.linalg.solve(h, (weight.double() @ (2 / len(ids) * xd.t() @ xp)).t()).t()

    def close(got, want):  # fp32 statistics against the fp64 reference: relative Frobenius error
        assert float((got.double() - want).norm() / want.norm()) < 1e-4
        assert float((want - weight_of(want)).norm() / want.norm()) > 1e-2  # and the refit did change the weight

    o_dense = dense.model.layers[1].self_attn.o_proj.weight
    weight_of = lambda w: (o_dense if w.shape == o_dense.shape else down_dense).double()
    down_dense = dense.model.layers[1].mlp.down_proj.weight
    close(method.seen[2][1], expected(lambda l: l.self_attn.o_proj, partial, o_dense))
    # down_proj: layer 1's heads are pruned by then (its o_proj as chosen), its FFN still dense
    partial.model.layers[1].self_attn = copy.deepcopy(model.model.layers[1].self_attn)
    close(method.seen[3][1], expected(lambda l: l.mlp.down_proj, partial, down_dense))


def test_drift_correction_brings_the_pruned_model_closer_to_the_dense_one():
    """On the calibration data the final hidden states of the corrected model are nearer the dense ones."""
    dense = tiny_model("llama")
    ids = calibration(24, 24)
    errors = {}
    for drift in (False, True):
        model = copy.deepcopy(dense)
        slimflow.prune(model, ids, ratio=0.4, schedule="uniform", progress=False, correct_drift=drift)
        with torch.no_grad():
            errors[drift] = float((model.model(ids).last_hidden_state - dense.model(ids).last_hidden_state).pow(2).mean())
    assert errors[True] < 0.9 * errors[False]


def test_drift_correction_keeps_pruned_equal_to_masked_and_reports_it():
    model = tiny_model("mistral")
    report = slimflow.prune(model, calibration(), ratio=0.3, progress=False, correct_drift=True)
    assert report.settings["correct_drift"] is True
    assert abs(report.realised_fraction - 0.3) < 0.05
    out = model(calibration(2, 8, seed=3)).logits
    assert torch.isfinite(out).all()


def test_drift_correction_is_refused_for_methods_that_prune_in_shots():
    with pytest.raises(InvalidValueError, match="correct_drift applies to layer-wise methods"):
        slimflow.prune(tiny_model("llama"), calibration(), ratio=0.3, method="llm-surgeon", progress=False,
                       correct_drift=True)
