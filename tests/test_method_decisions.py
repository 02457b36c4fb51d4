"""Each method's decisions and compensation through its public entry points, against brute-force references.

These are the checks that fail when a method's ranking is reversed, its compensation is dropped or a sign is
flipped (docs/results.md lists the mutations and which test catches each)."""

import math

import pytest
import torch
from tiny_models import tiny_model

import slimflow
from slimflow.adapters import get_adapter
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import obs_remove
from slimflow.methods import flap, llm_surgeon, slimllm, taylor, wanda_sp
from slimflow.methods.base import Budget
from slimflow.methods.common import covariance, softmax_shape

D = torch.float64


def problem(tokens=400, d_in=12, d_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=D) * torch.linspace(0.2, 3.0, d_in, dtype=D)
    x = x + torch.randn(d_in, generator=g, dtype=D)
    w = torch.randn(d_out, d_in, generator=g, dtype=D)
    stats = HessianAccumulator(d_in, dtype=D)
    for chunk in x.reshape(4, -1, d_in):
        stats.add(chunk[None])
    return w, x, stats


def calibration(n=8, seqlen=24, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- Wanda-sp
def test_wanda_sp_removes_the_least_important_units_and_channels():
    w, x, stats = problem()
    method = wanda_sp.WandaSP()
    col = x.norm(dim=0) * w.abs().mean(0)
    unit = col.reshape(4, 3).sum(-1)
    assert method.prune_heads(w, stats, 3, 2).removed == sorted(torch.argsort(unit)[:2].tolist())
    decision = method.prune_channels(w, stats, 4)
    assert decision.removed == sorted(torch.argsort(col)[:4].tolist())
    assert torch.equal(decision.weight[:, decision.removed], torch.zeros(6, 4, dtype=D))


# ------------------------------------------------------------------------------------------------- Taylor
def test_taylor_removes_the_units_of_lowest_importance():
    model = tiny_model("llama_gqa")
    method = taylor.Taylor(grad_batch_size=4)
    method.prepare(model, get_adapter(model), calibration(4, 12), None, torch.device("cpu"), 4)
    for index in range(3):
        method.begin_layer(index, model.model.layers[index], get_adapter(model))
        heads, chans = method._heads[index], method._channels[index]
        o = model.model.layers[index].self_attn.o_proj.weight.float()
        down = model.model.layers[index].mlp.down_proj.weight.float()
        assert method.prune_heads(o, None, 32, 1).removed == [int(torch.argmin(heads))]
        assert method.prune_channels(down, None, 10).removed == sorted(torch.argsort(chans)[:10].tolist())
    assert all(float(h.min()) >= 0 for h in method._heads)  # |w·g| importances


# ------------------------------------------------------------------------------------------------- FLAP
def test_flap_bias_keeps_the_mean_output_of_the_removed_columns():
    w, x, stats = problem()
    method = flap.FLAP()
    method._channels, method._index = [[1, 4, 9]], 0
    decision = method.prune_channels(w, stats, 3)
    dense = (x @ w.t()).mean(0)
    pruned = (x @ decision.weight.t()).mean(0) + decision.bias
    torch.testing.assert_close(pruned, dense)
    assert float((dense - (x @ decision.weight.t()).mean(0)).abs().max()) > 1e-3  # the bias matters here


def _output_mean(model, module: str, ids):
    """Mean over calibration tokens of layer 0's `module` ("self_attn.o_proj" or "mlp.down_proj") output."""
    acc = []
    handle = model.model.layers[0].get_submodule(module).register_forward_hook(
        lambda m, a, out: acc.append(out.reshape(-1, out.shape[-1]).double()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(acc).mean(0)


@pytest.mark.parametrize("method", ["flap", "slimllm"])
def test_written_output_bias_restores_the_dense_mean(method):
    """Layer 0's o_proj sees the same inputs before and after pruning (its down_proj too when no head went),
    so with the bias compensation its mean output equals the dense one (a wrong sign doubles the error)."""
    ids = calibration()
    model = tiny_model("llama_gqa")
    kwargs = {"layer_allocation": False} if method == "slimllm" else {}
    report = slimflow.prune(model, ids, 0.3, method=method, schedule="uniform" if kwargs else None,
                            method_kwargs=kwargs, batch_size=8, progress=False)
    layer = report.layers[0]
    module = "self_attn.o_proj" if len(layer.kept_units) < 2 else "mlp.down_proj"
    assert len(layer.kept_units) < 2 or len(layer.kept_channels) < 96
    reference = _output_mean(tiny_model("llama_gqa"), module, ids)
    pruned = _output_mean(model, module, ids)
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-4)
    bias = model.model.layers[0].get_submodule(module).bias
    assert float(bias.detach().abs().max()) > 1e-3  # the compensation is not negligible here


# ------------------------------------------------------------------------------------------------- SlimLLM
def test_slimllm_initial_head_pick_is_the_best_leave_one_out():
    w, x, stats = problem(d_in=18, d_out=6, seed=3)
    sigma = slimllm.head_output_covariances(w, covariance(stats), 3)
    loo = [float(slimllm.correlation_score(sigma, (torch.arange(6) != i)[None].to(D))[0]) for i in range(6)]
    expected = sorted(sorted(range(6), key=lambda i: -loo[i])[:2])
    assert slimllm.select_heads(sigma, 2, swap=False) == expected


def test_slimllm_removes_the_lowest_scoring_channels_after_the_protected_share():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    layer = model.model.layers[0]
    method = slimllm.SlimLLM(regression=False, protect=0.05, layer_allocation=False)
    method.begin_layer(0, layer, adapter)
    stats = HessianAccumulator(96, dtype=torch.float32)
    seen = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: stats.add(a[0]))
    handle2 = layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(calibration())
    handle.remove(), handle2.remove()
    down = layer.mlp.down_proj.weight.float()
    decision = method.prune_channels(down, stats, 10)
    method.end_layer(0, layer)
    a = torch.cat(seen).norm(dim=0)
    scores = slimllm.channel_scores(layer.mlp.gate_proj.weight.float(), layer.mlp.up_proj.weight.float(), down, a,
                                    stats)
    order = torch.argsort(scores).tolist()
    start = round(0.05 * 96)
    assert decision.removed == sorted(order[start : start + 10])


def test_softmax_allocation_follows_the_formula():
    scores = [0.2, 0.9, 0.5, 0.7]
    got = softmax_shape(scores, alpha=3.0, active=3)
    top = [1, 3, 2]
    z = sum(math.exp(3.0 * scores[i]) for i in top)
    expected = [0.0] + [3 * math.exp(3.0 * scores[i]) / z for i in (1, 2, 3)]
    assert got == pytest.approx(expected)


def test_slimllm_prunes_the_layers_that_change_their_input_least_the_most():
    model = tiny_model("llama", num_hidden_layers=4)
    method = slimllm.SlimLLM(active=0.75, alpha=20.0)
    report = slimflow.prune(model, calibration(), 0.25, method=method, progress=False)
    sim = method.layer_similarity
    ratios = [r.ratio for r in report.layers]
    assert ratios[min(range(4), key=sim.__getitem__)] == 0  # the most transforming layer is not pruned
    assert ratios[max(range(4), key=sim.__getitem__)] == max(ratios)


# ---------------------------------------------------------------------------------------------- LLM Surgeon
def test_llm_surgeon_chooses_the_cheapest_units_per_parameter():
    entries = [(4.0, 0, 0, 0, 10), (1.0, 0, 1, 0, 2), (3.0, 0, 1, 1, 2), (0.5, 1, 1, 0, 2), (2.0, 1, 0, 0, 10)]
    limits = [(1, 2), (1, 2)]
    chosen, costs = llm_surgeon.choose_cheapest(entries, 14, limits)
    # per parameter: 0.2 (L1 head) < 0.25 (L1 ch) < 0.4 (L0 head) < 0.5 (L0 ch0) < 1.5; 14 params = head + 2 ch
    assert chosen == {0: ([], [0]), 1: ([0], [0])} and costs[1] == [2.0, 0.5]
    by_cost, _ = llm_surgeon.choose_cheapest(entries, 2, limits, per_param=False)
    assert by_cost == {0: ([], []), 1: ([], [0])}


def test_llm_surgeon_update_is_the_correlated_obs_update_of_its_curvature():
    torch.manual_seed(0)
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = calibration(4, 16)
    inputs = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().reshape(-1, 96).double()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat(inputs)
    a = x.t() @ x / x.shape[0]
    a = a + 0.01 * torch.diagonal(a).mean() * torch.eye(96, dtype=D)
    old = model.model.layers[1].mlp.down_proj.weight.detach().double().clone()
    method = llm_surgeon.LLMSurgeon(shots=1, grad_batch_size=4)
    params = 3 * 64  # one channel: a gate row, an up row and a down column
    decisions = method.global_shot(model, adapter, ids, 3 * params, torch.device("cpu"), [(3, 90)] * 3)
    chans = [d for i, (_, d) in decisions.items() if d is not None and i == 1]
    assert chans, "the shot removed no channel of layer 1"
    decision = chans[0]
    expected, _ = obs_remove(old, torch.linalg.inv(a), torch.tensor(decision.removed))
    torch.testing.assert_close(decision.weight.double(), expected, rtol=1e-3, atol=1e-4)
    kept = [c for c in range(96) if c not in decision.removed]
    assert float((decision.weight.double()[:, kept] - old[:, kept]).abs().max()) > 1e-3


def test_budget_carries_what_width_allocating_methods_read():
    budget = Budget(shapes=[], target_params=10.0, fraction=0.2, reference_params=50)
    assert (budget.channel_multiple, budget.max_layer_ratio) == (1, None)


# ------------------------------------------------------------------------------------------------- magnitude
def test_magnitude_removes_the_smallest_columns():
    from slimflow.methods.magnitude import Magnitude

    w, _, _ = problem()
    norms = w.norm(dim=0)
    assert Magnitude().prune_channels(w, None, 3).removed == sorted(torch.argsort(norms)[:3].tolist())
    assert Magnitude().prune_heads(w, None, 4, 1).removed == [int(torch.argmin(norms.reshape(3, 4).sum(-1)))]
