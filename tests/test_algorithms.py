"""Numerical routines against closed forms and brute force, in float64 on small random inputs."""

import itertools
import math

import pytest
import torch

from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import (
    SingularHessianError,
    condition_hessian,
    downdate_inverse,
    invert_hessian,
    obs_remove,
    obs_remove_sequential,
    output_error,
)
from slimflow.algorithms.slimgpt import dgs_group_sizes, head_scores, prune_channels_dgs, prune_head_units

D = torch.float64


def random_problem(d_out=6, d_in=12, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=D) @ torch.randn(d_in, d_in, generator=g, dtype=D)
    w = torch.randn(d_out, d_in, generator=g, dtype=D)
    h = 2 * x.t() @ x / tokens
    return w, h, x


def test_hessian_accumulator_matches_direct_sum():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 5, 7, generator=g, dtype=D) for b in (3, 1, 4)]
    acc = HessianAccumulator(7, dtype=D)
    for b in batches:
        acc.add(b)
    x = torch.cat([b.reshape(-1, 7) for b in batches])
    n = sum(b.shape[0] for b in batches)
    torch.testing.assert_close(acc.hessian, 2 * x.t() @ x / n)
    torch.testing.assert_close(acc.mean, x.mean(0))
    assert acc.num_sequences == 8 and acc.num_tokens == 40


def test_hessian_rejects_non_finite():
    acc = HessianAccumulator(3)
    acc.add(torch.tensor([[float("inf"), 1.0, 0.0]]))
    with pytest.raises(FloatingPointError, match="float32 or bfloat16"):
        acc.check_finite("layer 0")


def test_obs_group_removal_equals_closed_form():
    w, h, _ = random_problem()
    g = torch.linalg.inv(h)
    cols = torch.tensor([1, 4, 5, 9])
    new, err = obs_remove(w, g, cols)
    # closed form: the survivors' optimal weight is the least-squares fit of the dense output on the kept inputs
    keep = torch.tensor([i for i in range(w.shape[1]) if i not in cols.tolist()])
    expected_keep = w @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])
    torch.testing.assert_close(new[:, keep], expected_keep)
    assert torch.all(new[:, cols] == 0)
    closed = 0.5 * torch.trace(w[:, cols] @ torch.linalg.inv(g[cols][:, cols]) @ w[:, cols].t())
    assert err == pytest.approx(float(closed), rel=1e-10)
    assert err == pytest.approx(output_error(new - w, h), rel=1e-9)


def test_joint_removal_equals_sequential_elimination():
    w, h, _ = random_problem(seed=3)
    g = torch.linalg.inv(h)
    cols = torch.tensor([0, 2, 7])
    a, ea = obs_remove(w, g, cols)
    b, eb = obs_remove_sequential(w, g, cols)
    torch.testing.assert_close(a, b)
    assert ea == pytest.approx(eb, rel=1e-10)


def test_compensation_never_worse_than_plain_deletion():
    for seed in range(5):
        w, h, _ = random_problem(seed=seed)
        cols = torch.randperm(12, generator=torch.Generator().manual_seed(seed))[:5]
        new, _ = obs_remove(w, torch.linalg.inv(h), cols)
        plain = torch.zeros_like(w)
        plain[:, cols] = -w[:, cols]
        assert output_error(new - w, h) <= output_error(plain, h) + 1e-12


def test_downdate_equals_reinversion():
    _, h, _ = random_problem(d_in=16, seed=4)
    g = torch.linalg.inv(h)
    cols = torch.tensor([3, 4, 11])
    down = downdate_inverse(g, cols)
    h_masked = h.clone()
    h_masked[cols, :] = 0
    h_masked[:, cols] = 0
    h_masked[cols, cols] = 1
    torch.testing.assert_close(down, torch.linalg.inv(h_masked))
    # and twice in a row, as in the greedy loop
    more = torch.tensor([0, 8])
    h_masked[more, :] = 0
    h_masked[:, more] = 0
    h_masked[more, more] = 1
    torch.testing.assert_close(downdate_inverse(down, more), torch.linalg.inv(h_masked))


def test_conditioning_dead_inputs_and_damping():
    w, h, _ = random_problem()
    h[2, :] = 0
    h[:, 2] = 0
    w2 = w.clone()
    cond, dead = condition_hessian(h, w2, damp=0.1)
    assert dead.tolist() == [i == 2 for i in range(12)]
    assert torch.all(w2[:, 2] == 0)
    diag_mean = torch.diagonal(h).clone()
    diag_mean[2] = 1
    assert cond[0, 0] == pytest.approx(float(h[0, 0] + 0.1 * diag_mean.mean()))


def test_invert_raises_damping_then_fails_clearly():
    h = torch.zeros(4, 4, dtype=D)
    h[0, 0] = 1.0
    h[1, 1] = -1.0  # indefinite: cannot be rescued by small damping
    g, extra = invert_hessian(torch.eye(4, dtype=D), 0.01)
    assert extra == 0 and torch.allclose(g, torch.eye(4, dtype=D))
    with pytest.raises(SingularHessianError, match="--num-samples"):
        invert_hessian(h * 1e6, 0.0, max_tries=2)


@pytest.mark.parametrize("unit", [2, 3])
def test_exact_head_score_is_joint_obs_error(unit):
    w, h, _ = random_problem(d_in=12, seed=5)
    g = torch.linalg.inv(h)
    scores = head_scores(w, g, unit, exact=True)
    for u in range(12 // unit):
        cols = torch.arange(u * unit, (u + 1) * unit)
        _, err = obs_remove(w, g, cols)
        assert float(scores[u]) == pytest.approx(err, rel=1e-9)


def test_grouped_cholesky_score_uses_conditional_variances():
    w, h, _ = random_problem(d_in=8, seed=6)
    g = torch.linalg.inv(h)
    scores = head_scores(w, g, 4, exact=False)
    for u in range(2):
        b = list(range(u * 4, (u + 1) * 4))
        expected = 0.0
        for i, j in enumerate(b):
            prev = b[:i]
            schur = g[j, j] - (g[j, prev] @ torch.linalg.solve(g[prev][:, prev], g[prev, j]) if prev else 0)
            expected += 0.5 * float((w[:, j] ** 2).sum() / schur)
        assert float(scores[u]) == pytest.approx(expected, rel=1e-9)


def test_greedy_single_head_equals_exhaustive_search():
    for seed in range(6):
        w, h, _ = random_problem(d_out=5, d_in=12, seed=seed)
        g = torch.linalg.inv(h)
        _, removed, _, err = prune_head_units(w, g, 3, 1)
        brute = min(range(4), key=lambda u: obs_remove(w, g, torch.arange(3 * u, 3 * u + 3))[1])
        assert removed == [brute]
        assert err == pytest.approx(obs_remove(w, g, torch.arange(3 * brute, 3 * brute + 3))[1])


def test_greedy_heads_two_steps_error_is_exact_and_finds_the_best_pair():
    w, h, _ = random_problem(d_out=5, d_in=12, seed=7)
    g = torch.linalg.inv(h)
    new, removed, g_after, err = prune_head_units(w, g, 3, 2)
    cols = torch.cat([torch.arange(3 * u, 3 * u + 3) for u in removed])
    joint, joint_err = obs_remove(w, g, cols.sort().values)
    torch.testing.assert_close(new, joint)  # sequential greedy compensation == joint removal of the chosen set
    assert err == pytest.approx(joint_err, rel=1e-9)
    pairs = {(a, b): obs_remove(w, g, torch.cat([torch.arange(3 * a, 3 * a + 3), torch.arange(3 * b, 3 * b + 3)]))[1]
             for a, b in itertools.combinations(range(4), 2)}
    best = min(pairs, key=pairs.get)
    # on this problem the greedy pick is the exhaustive optimum, by a wide margin over the runner-up
    assert sorted(removed) == list(best) and err == pytest.approx(pairs[best], rel=1e-9)


def test_dgs_group_sizes_match_reference_table():
    assert dgs_group_sizes(688) == [88] + [64] * 9 + [24]
    assert dgs_group_sizes(1376) == [432] + [64] * 14 + [48]
    assert dgs_group_sizes(2752) == [1024, 304] + [64] * 22 + [16]
    assert dgs_group_sizes(5504) == [1024, 992, 240] + [64] * 50 + [48]
    assert dgs_group_sizes(100) == [64, 36]
    for t in (1, 63, 641, 3000):
        assert sum(dgs_group_sizes(t)) == t


def test_dgs_channels_are_jointly_compensated_and_exact():
    w, h, _ = random_problem(d_out=4, d_in=20, seed=8)
    g = torch.linalg.inv(h)
    new, removed, _, err = prune_channels_dgs(w, g, 7, floor=3, cap=4)
    cols = torch.tensor(sorted(removed))
    joint, joint_err = obs_remove(w, g, cols)
    torch.testing.assert_close(new, joint)
    assert err == pytest.approx(joint_err, rel=1e-9)
    assert len(set(removed)) == 7


def test_dgs_single_step_picks_smallest_obs_errors():
    w, h, _ = random_problem(d_out=4, d_in=10, seed=9)
    g = torch.linalg.inv(h)
    _, removed, _, _ = prune_channels_dgs(w, g, 1)
    errs = [obs_remove(w, g, torch.tensor([j]))[1] for j in range(10)]
    assert removed == [min(range(10), key=errs.__getitem__)]
    assert math.isfinite(sum(errs))
