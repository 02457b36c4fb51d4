"""Each method's math against direct computation on small random inputs, and every method end to end."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import slimflow
from slimflow.adapters import get_adapter
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import obs_remove
from slimflow.algorithms.schedules import ScheduleError
from slimflow.checkpoint import load_pruned, save_pruned
from slimflow.methods import available_methods, flap, llm_surgeon, slimllm, taylor, wanda_sp
from slimflow.methods.common import covariance, lm_backward_passes

D = torch.float64


def inputs(tokens=300, d_in=12, d_out=5, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=D) @ torch.randn(d_in, d_in, generator=g, dtype=D)
    x = x + torch.randn(d_in, generator=g, dtype=D)  # non-zero means
    w = torch.randn(d_out, d_in, generator=g, dtype=D)
    stats = HessianAccumulator(d_in, dtype=D)
    for chunk in x.reshape(batch, -1, d_in):
        stats.add(chunk[None])
    return w, x, stats


def test_wanda_scores_are_activation_norm_times_mean_abs_weight():
    w, x, stats = inputs()
    direct = x.norm(dim=0) * w.abs().mean(0)
    torch.testing.assert_close(wanda_sp.column_scores(w, stats), direct)


def test_flap_fluctuation_and_bias_compensation():
    w, x, stats = inputs()
    var = x.var(0, unbiased=False)
    torch.testing.assert_close(flap.fluctuation_scores(w, stats), var * w.pow(2).sum(0))
    cols = [1, 5, 7]
    # the bias keeps the mean output of the removed columns
    torch.testing.assert_close(flap.bias_compensation(w, stats, cols), (x[:, cols] @ w[:, cols].t()).mean(0))
    z = flap.head_metric(w, stats, 4)
    s = (var * w.pow(2).sum(0)) ** 2
    torch.testing.assert_close(z, ((s - s.mean()) / s.std()).reshape(3, 4).mean(-1))


def _head_outputs(w, x, unit):
    n = w.shape[1] // unit
    return torch.stack([x[:, i * unit : (i + 1) * unit] @ w[:, i * unit : (i + 1) * unit].t() for i in range(n)])


def _pearson_score(outputs, keep):
    total = outputs.sum(0)
    part = outputs[keep].sum(0)
    return sum(abs(float(torch.corrcoef(torch.stack([part[:, k], total[:, k]]))[0, 1])) for k in range(total.shape[1]))


def test_slimllm_correlation_score_equals_direct_pearson():
    w, x, stats = inputs(d_in=12, d_out=6)
    sigma = slimllm.head_output_covariances(w, covariance(stats), 3)
    outputs = _head_outputs(w, x, 3)
    torch.testing.assert_close(sigma[:, 0, 2], (outputs[0] - outputs[0].mean(0)).mul(outputs[2] - outputs[2].mean(0)).mean(0))
    masks = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0]])
    got = slimllm.correlation_score(sigma, masks)
    for mask, value in zip(masks, got):
        keep = [i for i in range(4) if mask[i]]
        assert abs(float(value) - _pearson_score(outputs, keep)) < 1e-8


def test_slimllm_swap_search_finds_the_best_single_removal_and_never_loses():
    w, x, stats = inputs(d_in=18, d_out=6, seed=3)
    sigma = slimllm.head_output_covariances(w, covariance(stats), 3)
    n = 6
    best = max(range(n), key=lambda i: float(slimllm.correlation_score(sigma, (torch.arange(n) != i)[None].to(D))[0]))
    assert slimllm.select_heads(sigma, 1) == [best]
    for k in (2, 3):
        score = lambda removed: float(slimllm.correlation_score(
            sigma, torch.tensor([[0.0 if i in removed else 1.0 for i in range(n)]], dtype=D))[0])
        assert score(slimllm.select_heads(sigma, k)) >= score(slimllm.select_heads(sigma, k, swap=False)) - 1e-12


def test_slimllm_regression_refit_matches_lstsq():
    w, x, stats = inputs()
    kept = [0, 2, 3, 6, 7, 8, 11]
    new, bias = slimllm.regression_refit(w, stats, kept)
    y, xk = x @ w.t(), x[:, kept] @ w[:, kept].t()
    for k in range(w.shape[0]):
        design = torch.stack([xk[:, k], torch.ones_like(xk[:, k])], 1)
        a, b = torch.linalg.lstsq(design, y[:, k : k + 1]).solution[:, 0]
        torch.testing.assert_close(new[k, kept], a * w[k, kept])
        torch.testing.assert_close(bias[k], b)
    assert torch.all(new[:, [1, 4, 5, 9, 10]] == 0)


def test_slimllm_channel_score_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    d, m, n = 6, 10, 400
    xin = torch.randn(n, d, generator=g, dtype=D)
    w_gate, w_up, w_down = (torch.randn(*s, generator=g, dtype=D) for s in ((m, d), (m, d), (d, m)))
    h = torch.nn.functional.silu(xin @ w_gate.t()) * (xin @ w_up.t())
    stats = HessianAccumulator(m, dtype=D)
    stats.add(h[None])
    y = h @ w_down.t()
    yc = y - y.mean(0)
    lam, vec = torch.linalg.eigh(yc.t() @ yc)
    wt = torch.sigmoid(lam / lam.mean())
    a = xin.norm(dim=0)
    direct = torch.stack([
        (w_gate[c] * a).norm() + (w_up[c] * a).norm() + h[:, c].norm() * ((vec.t() @ w_down[:, c]).abs() * wt).norm()
        for c in range(m)])
    torch.testing.assert_close(slimllm.channel_scores(w_gate, w_up, w_down, a, stats), direct)


def test_kfac_costs_and_updates_match_the_explicit_kronecker_product():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, unit = 3, 6, 2
    w = torch.randn(d_out, d_in, generator=g, dtype=D)
    mg, ma = torch.randn(d_out, 9, generator=g, dtype=D), torch.randn(d_in, 20, generator=g, dtype=D)
    gf, af = mg @ mg.t() / 9, ma @ ma.t() / 20
    fisher = torch.kron(gf, af)  # vec(W) row-major: index i·d_in + j
    finv = torch.linalg.inv(fisher)
    ainv = torch.linalg.inv(af)
    for size, costs in ((1, llm_surgeon.column_costs(w, gf, ainv)), (unit, llm_surgeon.column_costs(w, gf, ainv, unit))):
        for u in range(d_in // size):
            cols = list(range(u * size, (u + 1) * size))
            q = torch.tensor([i * d_in + j for i in range(d_out) for j in cols])
            wq = w.flatten()[q]
            explicit = 0.5 * wq @ torch.linalg.solve(finv[q][:, q], wq)
            assert abs(float(costs[u]) - float(explicit)) < 1e-8
            delta = -(finv[:, q] @ torch.linalg.solve(finv[q][:, q], wq)).reshape(d_out, d_in)
            new, _ = obs_remove(w, ainv, torch.tensor(cols))
            torch.testing.assert_close(new - w, delta)
            # the optimum's loss increase is the cost
            assert abs(0.5 * float(delta.flatten() @ fisher @ delta.flatten()) - float(explicit)) < 1e-8


def test_kronecker_factors_accumulate_inputs_and_output_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    fac = llm_surgeon.KroneckerFactors(lin)
    x = torch.randn(5, 4, requires_grad=True)
    out = lin(x)
    grad = torch.randn(5, 3)
    out.backward(grad)
    gf, af = fac.factors(0.0)
    torch.testing.assert_close(af, x.detach().t() @ x.detach() / 5)
    torch.testing.assert_close(gf, grad.t() @ grad / 5)


def test_taylor_scores_equal_autograd_products():
    model = tiny_model("llama_gqa")
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    method = taylor.Taylor(grad_batch_size=3)
    method.prepare(model, get_adapter(model), ids, None, torch.device("cpu"), 4)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    grads = torch.autograd.grad(loss, [m.weight for m in mods])
    p = [(m.weight * gr).abs().detach() for m, gr in zip(mods, grads)]
    # 2 KV groups of 2 query heads (head_dim 16): q rows 32 per unit, k/v rows 16, o columns 32
    direct = torch.stack([p[0][32 * u : 32 * (u + 1)].sum() + p[1][16 * u : 16 * (u + 1)].sum()
                          + p[2][16 * u : 16 * (u + 1)].sum() + p[3][:, 32 * u : 32 * (u + 1)].sum() for u in range(2)])
    torch.testing.assert_close(method._heads[1], direct, rtol=1e-4, atol=1e-6)
    direct = p[4].sum(1) + p[5].sum(1) + p[6].sum(0)
    torch.testing.assert_close(method._channels[1], direct, rtol=1e-4, atol=1e-6)
    assert all(not prm.requires_grad or prm.grad is None for prm in model.parameters())


def test_backward_passes_restore_flags_and_average_the_loss():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    flags = [p.requires_grad for p in model.parameters()]
    nll = lm_backward_passes(model, ids, 2, "cpu")
    with torch.no_grad():
        logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(nll - float(ref)) < 1e-5
    assert flags == [p.requires_grad for p in model.parameters()]


def calibration(n=8, seqlen=24):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "taylor", "slimllm", "llm-surgeon"])
def test_every_method_prunes_and_reloads(method, tmp_path):
    assert method in available_methods()
    model = tiny_model("llama_gqa")
    report = slimflow.prune(model, calibration(), ratio=0.3, method=method, progress=False)
    assert abs(report.realised_fraction - 0.3) < 0.06
    assert report.params_after == sum(p.numel() for p in model.parameters())
    ids = calibration(2, 10)
    with torch.no_grad():
        expected = model(ids).logits
    save_pruned(model, tmp_path / "ckpt", report=report)
    for loaded in (load_pruned(tmp_path / "ckpt"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)):
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected)
    if method in ("flap", "slimllm"):  # the compensation biases were written and survive reloading
        layers = load_pruned(tmp_path / "ckpt").model.layers
        assert sum(float(l.self_attn.o_proj.bias.detach().abs().sum() + l.mlp.down_proj.bias.detach().abs().sum()) for l in layers) > 0


def test_widths_allocating_methods_refuse_a_schedule():
    for method in ("flap", "slimllm", "llm-surgeon"):
        with pytest.raises(ScheduleError, match="allocates per-layer widths itself"):
            slimflow.prune(tiny_model("llama"), calibration(), 0.3, schedule="linear", method=method, progress=False)
    # SlimLLM without its allocation follows any schedule
    report = slimflow.prune(tiny_model("llama"), calibration(), 0.3, schedule="linear", method="slimllm",
                            method_kwargs={"layer_allocation": False}, progress=False)
    assert report.settings["schedule"] == "linear"


def test_bias_writing_methods_refuse_families_without_bias_flags():
    with pytest.raises(ValueError, match="cannot hold"):
        slimflow.prune(tiny_model("mistral"), calibration(), 0.3, method="flap", progress=False)
    slimflow.prune(tiny_model("mistral"), calibration(), 0.3, method="flap", method_kwargs={"bias": False},
                   progress=False)


def test_flap_allocation_meets_the_budget_and_keeps_a_unit_per_layer():
    head = [torch.tensor([0.0, -1.0, 2.0]), torch.tensor([-3.0, -2.0, -1.5])]
    chan = [torch.tensor([0.5, -0.5, 1.0, 1.5]), torch.tensor([-4.0, 3.0, 2.0, 1.0])]
    from slimflow.algorithms.schedules import LayerShape

    shapes = [LayerShape(3, 10, 4, 2)] * 2
    heads, chans = flap.global_allocation(head, chan, shapes, target=24)
    # L1 loses two heads (its third must stay); L0 head 1 would overshoot, so the cheap channel fills the rest
    assert heads == [[], [0, 1]] and chans == [[1], [0]]


def test_llm_surgeon_multi_shot_reaches_the_target():
    model = tiny_model("llama")
    method = llm_surgeon.LLMSurgeon(shots=3)
    report = slimflow.prune(model, calibration(), ratio=0.35, method=method, progress=False)
    assert abs(report.realised_fraction - 0.35) < 0.03 and len(method.losses) == 3
    assert all(w.num_attention_heads >= 1 and w.intermediate_size >= 1 for w in report.widths)
